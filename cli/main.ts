/**
 * The command line: `deno task pretrain|demo|eval|extract|bench` all land here.
 * Config file first, flags override it; failures print one clear line naming
 * the problem (and exit 1), never a stack trace.
 */
import { NodeRuntime, NodeServices } from "@effect/platform-node";
import { Effect, Option } from "effect";
import { Command, Flag } from "effect/cli";
import { BackendName, resolveBackendName, TensorBackend } from "../backend/tensor_backend.ts";
import { CommunicatorService } from "../backend/communicator.ts";
import { PrecisionChoice, resolvePrecision } from "../backend/precision.ts";
import { decodeRunConfig, mergeConfig, MethodName, readRawConfig, type RunConfig } from "../config/config.ts";
import { factsOf, withDataDefaults } from "../config/data_defaults.ts";
import { parseSetting, settingsObject } from "../config/settings.ts";
import { RECIPE_NAMES, recipeConfig, type RecipeName } from "../config/recipes.ts";
import { openSource } from "../data/sources.ts";
import { resolveSourceSpec } from "../pipelines/sources.ts";
import { pretrain } from "../pipelines/pretrain.ts";
import { withDashboard } from "./dashboard.ts";
import { demoConfig, runDemo } from "../pipelines/demo.ts";
import { announceSpeedupHint } from "../pipelines/environment.ts";
import { plural } from "../pipelines/wording.ts";
import { progressHooks } from "./progress.ts";
import { reportFailure } from "./report.ts";
import { evalCommand, exportCommand, extractCommand } from "./eval_commands.ts";
import { exitWithWrapper } from "./wrapper_watch.ts";
import { abortJobOnFailure, launchUnderMpi, shouldLaunch } from "./launch.ts";
import { checkKnobs } from "./knobs.ts";
import { precheckEarlierRun } from "../pipelines/run_history.ts";
import { launchedByMpi } from "../backend/mpi.ts";

/** Commands that run long enough to outlive a killed `npx deno task` wrapper. */
const longCommands = new Set(["pretrain", "demo", "eval", "extract", "export"]);

const configFlag = Flag.String("config").pipe(
  Flag.withDescription("JSON config file (any subset of the fields)"),
  Flag.optional,
);
const dataFlag = Flag.String("data").pipe(
  Flag.withDescription("SOURCE: an IDX, CIFAR or image folder, optionally :train/:test; or builtin:demo"),
  Flag.optional,
);
const epochsFlag = Flag.Int("epochs").pipe(Flag.withDescription("epochs to train"), Flag.optional);
const outFlag = Flag.String("out").pipe(
  Flag.withDescription("run folder (config, metrics.jsonl, checkpoints)"),
  Flag.optional,
);
const backendFlag = Flag.Literals("backend", BackendName.literals).pipe(
  Flag.withDescription("tensor backend (default: SWAV_BACKEND, else auto)"),
  Flag.optional,
);
const seedFlag = Flag.Int("seed").pipe(Flag.withDescription("seed of every random choice"), Flag.optional);
const jsonFlag = Flag.Boolean("json").pipe(
  Flag.withDescription("end with one JSON line for scripts"),
  Flag.withDefault(false),
);

/** Flag values as a partial config, to merge over the file's. */
const overrides = (flags: {
  data?: string;
  epochs?: number;
  out?: string;
  backend?: string;
  seed?: number;
  batchSize?: number;
  maxSteps?: number;
  workers?: number;
  syncBatchNorm?: boolean;
  onlineProbe?: boolean;
  precision?: string;
  method?: string;
}) => ({
  data: { source: flags.data, workers: flags.workers },
  model: { syncBatchNorm: flags.syncBatchNorm },
  train: {
    method: flags.method,
    onlineProbe: flags.onlineProbe,
    epochs: flags.epochs,
    out: flags.out,
    backend: flags.backend,
    seed: flags.seed,
    batchSize: flags.batchSize,
    maxSteps: flags.maxSteps,
    precision: flags.precision,
  },
});

/** `--set KEY=JSON` settings, each checked against the schema on its own, as a partial config. */
const settingsOf = (texts: readonly string[]) =>
  Effect.gen(function* () {
    const settings = [];
    for (const text of texts) {
      const setting = parseSetting(text, `--set ${text}`);
      if (setting instanceof Error) return yield* setting;
      settings.push(setting);
    }
    return settingsObject(settings);
  });

/**
 * The resolved config: the recipe, the file over it, `--set` settings over
 * those, the explicit flags over everything, then the data set's defaults
 * where none says (config/data_defaults.ts), then the schema's defaults;
 * validated once, naming the file in errors.
 */
const resolveConfig = (
  file: Option.Option<string>,
  explicitFlags: { data?: { source?: string | undefined }; train?: { epochs?: number | undefined } },
  recipe: Option.Option<RecipeName> = Option.none(),
  sets: readonly string[] = [],
) =>
  Effect.gen(function* () {
    const flagOverrides = mergeConfig(yield* settingsOf(sets), explicitFlags) as typeof explicitFlags;
    const name = Option.getOrElse(file, () =>
      Option.isSome(recipe) ? `recipe ${recipe.value}` : "command line");
    const fileRaw = Option.isSome(file) ? yield* readRawConfig(file.value) : undefined;
    // A recipe is the base, its schedule rescaled to the epochs asked for; a config file merges over it.
    // Without either, the built-in data set trains with the demo's recipe (sized for a CPU); other
    // sources start from the schema's defaults (the paper's recipe).
    const fileEpochs = (fileRaw as { train?: { epochs?: unknown } } | undefined)?.train?.epochs;
    const epochs = flagOverrides.train?.epochs ?? (typeof fileEpochs === "number" ? fileEpochs : undefined);
    const base = Option.isSome(recipe)
      ? mergeConfig(recipeConfig(recipe.value, epochs), fileRaw ?? {})
      : fileRaw !== undefined
      ? fileRaw
      : isBuiltinDemo(flagOverrides)
      ? demoConfig
      : {};
    const raw = mergeConfig(base, flagOverrides);
    const provisional = yield* decodeRunConfig(raw, name);
    const source = yield* openSource(
      yield* resolveSourceSpec(provisional.data.source),
      provisional.data.channels === undefined ? {} : { channels: provisional.data.channels },
    );
    // The small-data recipe crops at the images' own side unless the user's file names a size.
    const fileCrops = (fileRaw as { multicrop?: { sizeCrops?: unknown } } | undefined)?.multicrop?.sizeCrops;
    const cropSideFromData = Option.getOrUndefined(recipe) === "small-data" && fileCrops === undefined &&
      source.length > 0;
    const side = cropSideFromData
      ? yield* Effect.map(source.read(0), (s) =>
        Math.min(s.image.width, s.image.height))
      : undefined;
    return yield* decodeRunConfig(withDataDefaults(raw, factsOf(source, side), { cropSideFromData }), name);
  });

/** True when the flags name no data source, or the built-in one. */
const isBuiltinDemo = (flagOverrides: { data?: { source?: string | undefined } }): boolean => {
  const source = flagOverrides.data?.source;
  return source === undefined || source.startsWith("builtin:demo");
};

/** The backend: an explicit flag wins, then SWAV_BACKEND, then the config's (default auto). */
/** The backend a run asks for: the flag, else SWAV_BACKEND, else the config's. */
const backendChoice = (config: RunConfig, flag: Option.Option<string>) =>
  resolveBackendName(Option.getOrUndefined(flag) as BackendName | undefined, config.train.backend);

const backendLayer = (config: RunConfig, flag: Option.Option<string>, threads?: number) =>
  TensorBackend.layer(backendChoice(config, flag), {
    syncBatchNorm: config.model.syncBatchNorm,
    // Resolved before (resolvePrecision): `auto` never reaches the kernels.
    precision: config.train.precision === "bf16" ? "bf16" : "fp32",
    ...(threads === undefined ? {} : { threads }),
  });

/** `--procs`, `--hostfile`, `--threads`, `--sync-bn`: data-parallel training over MPI (cli/launch.ts). */
export const parallelFlags = {
  procs: Flag.Int("procs").pipe(
    Flag.withDescription(
      "train on N processes (MPI data parallel: mpiexec on this machine, or the hosts of --hostfile); " +
        "the batch is split between them",
    ),
    Flag.optional,
  ),
  hostfile: Flag.String("hostfile").pipe(
    Flag.withDescription("MPICH host file (one host[:slots] a line) for --procs on several machines"),
    Flag.optional,
  ),
  threads: Flag.Int("threads").pipe(
    Flag.withDescription("native threads per process (default SWAV_THREADS, else cores / procs)"),
    Flag.optional,
  ),
  syncBn: Flag.Boolean("sync-bn").pipe(
    Flag.withDescription(
      "batch norm over the global batch when --procs > 1 (model.syncBatchNorm, default true)",
    ),
    Flag.optional,
  ),
};

const pretrainCommand = Command.make("pretrain", {
  config: configFlag,
  data: dataFlag,
  epochs: epochsFlag,
  out: outFlag,
  backend: backendFlag,
  seed: seedFlag,
  precision: Flag.Literals("precision", PrecisionChoice.literals).pipe(
    Flag.withDescription(
      "fp32, bf16 (convolutions in bfloat16 where the processor has it) or auto (train.precision)",
    ),
    Flag.optional,
  ),
  resume: Flag.Boolean("resume").pipe(
    Flag.withDescription("continue from the latest checkpoint in --out"),
    Flag.withDefault(false),
  ),
  force: Flag.Boolean("force").pipe(
    Flag.withDescription("--out holds a run: move it into --out/previous-N (never deleted) and start anew"),
    Flag.withDefault(false),
  ),
  init: Flag.String("init").pipe(
    Flag.withDescription("start a fresh run from these weights (a PyTorch checkpoint: .pt, .pth, .pth.tar)"),
    Flag.optional,
  ),
  batchSize: Flag.Int("batch-size").pipe(Flag.withDescription("images per step"), Flag.optional),
  maxSteps: Flag.Int("max-steps").pipe(
    Flag.withDescription("stop after this many steps in total (smoke runs)"),
    Flag.optional,
  ),
  workers: Flag.Int("workers").pipe(Flag.withDescription("data worker threads"), Flag.optional),
  recipe: Flag.Literals("recipe", RECIPE_NAMES).pipe(
    Flag.withDescription(
      "start from a preset: the reference's scripts (swav_800ep_pretrain, swav_400ep_pretrain, " +
        "swav_400ep_bs256_pretrain) or small-data; --epochs rescales its schedule",
    ),
    Flag.optional,
  ),
  onlineProbe: Flag.Boolean("online-probe").pipe(
    Flag.withDescription(
      "train a linear probe on the detached features during pretraining (labelled sources)",
    ),
    Flag.optional,
  ),
  method: Flag.Literals("method", MethodName.literals).pipe(
    Flag.withDescription("training method: swav (default), deepclusterv2 or simclr (train.method)"),
    Flag.optional,
  ),
  set: Flag.String("set").pipe(
    Flag.withDescription(
      "KEY=JSON: set one config field (dotted key, JSON value; repeatable), e.g. --set swav.epsilon=0.03 " +
        "--set 'multicrop.nmbCrops=[2,4]'. Precedence: recipe < --config file < --set < the other flags",
    ),
    Flag.atLeast(0),
  ),
  json: jsonFlag,
  dashboard: Flag.Boolean("dashboard").pipe(
    Flag.withDescription("serve the run's live report on 127.0.0.1 (a free port; the URL goes to stderr)"),
    Flag.withDefault(false),
  ),
  ...parallelFlags,
}, (flags) =>
  reportFailure(
    Effect.gen(function* () {
      const requested = yield* resolveConfig(
        flags.config,
        overrides({
          data: Option.getOrUndefined(flags.data),
          epochs: Option.getOrUndefined(flags.epochs),
          out: Option.getOrUndefined(flags.out),
          backend: Option.getOrUndefined(flags.backend),
          seed: Option.getOrUndefined(flags.seed),
          batchSize: Option.getOrUndefined(flags.batchSize),
          maxSteps: Option.getOrUndefined(flags.maxSteps),
          workers: Option.getOrUndefined(flags.workers),
          syncBatchNorm: Option.getOrUndefined(flags.syncBn),
          onlineProbe: Option.getOrUndefined(flags.onlineProbe),
          precision: Option.getOrUndefined(flags.precision),
          method: Option.getOrUndefined(flags.method),
        }),
        flags.recipe,
        flags.set,
      );
      const backendAsked = yield* backendChoice(requested, flags.backend);
      const resolved = resolvePrecision(requested.train.precision, backendAsked);
      const config = { ...requested, train: { ...requested.train, precision: resolved.precision } };
      // --procs, --threads and --hostfile are checked (with the batch) before any process starts.
      const knobs = yield* checkKnobs({
        procs: Option.getOrUndefined(flags.procs),
        threads: Option.getOrUndefined(flags.threads),
        hostfile: Option.getOrUndefined(flags.hostfile),
        batchSize: config.train.batchSize,
      });
      if (!launchedByMpi()) {
        if (knobs.warning !== undefined) console.error(`warning: ${knobs.warning}`);
        // An earlier run in --out is refused before any process starts (checked again under the lock).
        yield* precheckEarlierRun(config.train.out, { resume: flags.resume, force: flags.force });
      }
      const threads = knobs.threads;
      // --procs N: this process only starts mpiexec, which runs this same command as N ranks.
      if (shouldLaunch(Option.getOrUndefined(flags.procs))) {
        Deno.exitCode = yield* launchUnderMpi({
          procs: Option.getOrThrow(flags.procs),
          hostfile: Option.getOrUndefined(flags.hostfile),
          runFolder: config.train.out,
          threads,
          script: new URL(import.meta.url).pathname,
          args: Deno.args,
        });
        return;
      }
      const comm = yield* CommunicatorService;
      const lead = comm.rank === 0;
      if (lead && resolved.note !== undefined) console.error(resolved.note);
      // Image folders may hold JPEGs; the built-in set is PNG.
      if (lead) {
        yield* announceSpeedupHint({
          backend: yield* backendChoice(config, flags.backend),
          jpeg: !config.data.source.startsWith("builtin:"),
        });
      }
      const run = pretrain(config, {
        resume: flags.resume,
        force: flags.force,
        ...(Option.isSome(flags.init) ? { init: flags.init.value } : {}),
        // Rank 0 alone reports (and writes the run folder).
        hooks: lead ? progressHooks() : {},
      });
      const result = yield* abortJobOnFailure(
        comm,
        withDashboard(flags.dashboard && lead, config.train.out, run).pipe(
          Effect.provide(backendLayer(config, flags.backend, threads)),
        ),
      );
      if (!lead) return;
      const summary = {
        steps: result.steps,
        epochs: result.epochs,
        loss: result.lastLoss,
        run: result.runFolder,
        checkpoint: result.checkpoint,
        skipped: result.skippedSamples,
      };
      console.log(
        flags.json
          ? JSON.stringify(summary)
          : `done: ${plural(summary.steps, "step")}, last loss ${
            summary.loss.toFixed(4)
          }, checkpoint ${summary.checkpoint}`,
      );
    }).pipe(Effect.provide(CommunicatorService.auto)),
  )).pipe(
    Command.withDescription("Pretrain a SwAV model (config file + flag overrides)"),
  );

const demoCommand = Command.make("demo", {
  epochs: epochsFlag,
  out: outFlag,
  backend: backendFlag,
  seed: seedFlag,
  json: jsonFlag,
}, (flags) =>
  reportFailure(
    // The demo's data are PNGs: only the native kernels would speed it up.
    Effect.andThen(
      announceSpeedupHint({ backend: Option.getOrElse(flags.backend, () => "auto" as const), jpeg: false }),
      runDemo({
        epochs: Option.getOrUndefined(flags.epochs),
        out: Option.getOrUndefined(flags.out),
        seed: Option.getOrUndefined(flags.seed),
        json: flags.json,
        hooks: progressHooks(),
        backend: Option.getOrUndefined(flags.backend) as BackendName | undefined,
      }),
    ),
  )).pipe(
    Command.withDescription(
      "Pretrain on the built-in data set, then compare kNN accuracy with random features",
    ),
  );

export const cli = Command.make("swav").pipe(
  Command.withDescription("SwAV self-supervised representation learning"),
  Command.withSubcommands([pretrainCommand, demoCommand, evalCommand, extractCommand, exportCommand]),
);

if (import.meta.main) {
  // A long command stops with npm's Node wrapper: no orphan goes on writing into a run folder.
  if (longCommands.has(Deno.args[0] ?? "")) exitWithWrapper();
  cli.pipe(Command.run({ version: "0.1.0" }), Effect.provide(NodeServices.layer), NodeRuntime.runMain);
}
