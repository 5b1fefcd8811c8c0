/**
 * `deno task bench`: every stage of a SwAV training step on its own, and the
 * whole step, on synthetic data with fixed shapes (no data set needed).
 *
 *   deno task bench [--json] [--stage NAME] [--backend wasm] [--threads N] [--reps N]
 *                   [--arch resnet18] [--width 16] [--batch 64] [--crops 2x32+4x16]
 *                   [--hidden 2048] [--out 128] [--prototypes 3000] [--no-blas]
 *                   [--procs N] [--sync-bn true|false] [--precision fp32|bf16|auto] [--help]
 *
 * Stages (the names of bench/torch_step.py too):
 *
 *   decode           PNG bytes -> RGB, one batch of 32x32 images
 *   multicrop        multi-crop augmentation of one batch, plus collation into tensors
 *   encode_forward   backbone + head + prototype scores (training mode)
 *   encode_backward  the encoder's backward pass: (forward + backward with a fixed
 *                    upstream gradient of the scores) minus encode_forward
 *   sinkhorn         codes of the assignment crops from the detached scores
 *   swapped_loss     the loss and its gradient with respect to the scores
 *   optimise         one LARC-SGD update of every trainable variable
 *   step             normalise prototypes, forward, codes, loss, backward, update
 *
 * `ms` is the median over `--reps` timed runs after a warm-up (one run, more for cheap stages);
 * `images_per_s` is batch / (ms / 1000) (samples, not crops). With `--json`
 * each stage prints one line {"stage", "ms", "images_per_s", ...}. The default
 * configuration is the benchmark one of BENCHMARKS.md: ResNet-18, cifar stem,
 * width 16, batch 64, 2 crops of 32x32, head 2048/128, 3000 prototypes, LARC-SGD.
 *
 * `--procs N` times the data-parallel step over MPI: the command re-runs itself
 * as N processes under `mpiexec` (cli/launch.ts); `--batch` is the global batch,
 * split evenly across them; gradients are averaged over the processes before
 * the update (and, where the kernels support it, batch norm and Sinkhorn sum
 * over the global batch: `--sync-bn`). Rank 0 alone prints, with `procs` added;
 * `ms` is then the median wall time of one data-parallel step and
 * `images_per_s` counts the global batch. Without `--threads` each process gets
 * max(1, cores / N) threads.
 */
import * as tf from "@tensorflow/tfjs";
import { Effect, Layer, ManagedRuntime, Schema } from "effect";
import { Image } from "imagescript";
import { activeCommunicator, CommunicatorService } from "../backend/communicator.ts";
import { defaultThreads } from "../backend/kernel_settings.ts";
import { leanVariableGrads } from "../backend/lean_gradients.ts";
import { dnnlInfo } from "../backend/onednn.ts";
import {
  type PrecisionChoice,
  PrecisionChoice as PrecisionChoices,
  resolvePrecision,
} from "../backend/precision.ts";
import { blasInfo } from "../backend/openblas.ts";
import { type BackendName, backendNames, TensorBackend } from "../backend/tensor_backend.ts";
import { decodeRunConfig, MethodName, type RunConfig } from "../config/config.ts";
import { benchMethod, methodBenchStep } from "./method_step.ts";
import { renderDemoImage } from "../data/demo_dataset.ts";
import { rngFor } from "../data/rng.ts";
import { PROTOTYPES_WEIGHT } from "../models/head.ts";
import { disposeModel, makeSwavModel, modelForward, type SwavModel } from "../models/model.ts";
import { normalisePrototypes } from "../models/prototypes.ts";
import { announceSpeedupHint } from "../pipelines/environment.ts";
import { forwardBackward, swavTape } from "../pipelines/swav_step.ts";
import { averageGradients, everyRankHasBatch, meanOverRanks } from "../pipelines/data_parallel.ts";
import { launchUnderMpi, shouldLaunch } from "../cli/launch.ts";
import { decodeImagePromise } from "../data/image_codec.ts";
import { collateCrops, MulticropConfig, multicropSample } from "../stages/multicrop.ts";
import { LarcSgd } from "../stages/optimise.ts";
import { assignmentCodes, swappedLossFromCodes } from "../stages/swapped_loss.ts";

export const stageNames = [
  "decode",
  "multicrop",
  "encode_forward",
  "encode_backward",
  "sinkhorn",
  "swapped_loss",
  "optimise",
  "step",
] as const;
export type StageName = (typeof stageNames)[number];

export interface BenchOptions {
  readonly json: boolean;
  readonly stages: readonly StageName[];
  readonly backend: BackendName;
  readonly threads: number;
  readonly reps: number;
  readonly blas: boolean;
  readonly arch: "resnet18" | "resnet34" | "resnet50";
  readonly width: number;
  readonly batch: number;
  /** Crop groups: [count, size] each, e.g. 2x32+4x16. */
  readonly crops: readonly (readonly [number, number])[];
  readonly hidden: number;
  readonly out: number;
  readonly prototypes: number;
  /** Processes of the data-parallel step (`--batch` is split across them). */
  readonly procs: number;
  /** Batch norm over the global batch when procs > 1. */
  readonly syncBn: boolean;
  /** `--threads` was given (else each process gets cores / procs). */
  readonly threadsGiven: boolean;
  /** `--precision` as asked (resolved against the processor when the backend starts). */
  readonly precision: PrecisionChoice;
  /** The training method the step runs (train.method). */
  readonly method: MethodName;
}

/** What `bench --help` prints. */
export const benchUsage =
  `deno task bench: each stage of a SwAV training step, and the whole step, on synthetic data

  --stage NAME        one of ${stageNames.join(", ")} (default: all)
  --json              one JSON line per stage {"stage", "ms", "images_per_s", ...}
  --backend NAME      ${backendNames.join(", ")} (default wasm)
  --threads N         native threads per process (default SWAV_THREADS, else cores / procs)
  --reps N            timed runs per stage after a warm-up; ms is their median (default 5)
  --arch A            resnet18, resnet34 or resnet50 (default resnet18, cifar stem)
  --width N           channels of the first stage (default 16)
  --batch N           images per step: the global batch, split across --procs (default 64)
  --crops SPEC        crop groups COUNTxSIZE joined by + (default 2x32)
  --hidden N          projection head's hidden width (default 2048; 0: one linear layer)
  --out N             embedding size (default 128)
  --prototypes N      prototypes (default 3000)
  --no-blas           plain wasm kernels (no OpenBLAS / oneDNN)
  --procs N           time the data-parallel step on N MPI processes (mpiexec, Debian 'mpich'); rank 0
                      prints, with "procs"; ms is the median wall time of one data-parallel step and
                      images_per_s counts the global batch (default 1)
  --sync-bn BOOL      true|false: batch norm over the global batch when --procs > 1 (default true)
  --precision P       fp32, bf16 (oneDNN convolutions in bfloat16 where native) or auto (default fp32)
  --method M          swav, deepclusterv2 or simclr: the step's method (default swav; the others time
                      --stage step only, in one process)
  --help              this text`;

/** Parses `2x32+4x16`` into [[2, 32], [4, 16]]. */
export const parseCrops = (text: string): [number, number][] =>
  text.split("+").map((part) => {
    const match = /^(\d+)x(\d+)$/.exec(part.trim());
    if (match === null) throw new Error(`--crops: '${part}' is not COUNTxSIZE (e.g. 2x32+4x16)`);
    return [Number(match[1]), Number(match[2])];
  });

/** Parses the command line; throws with a readable message on a bad flag. */
export const parseBenchArgs = (args: readonly string[]): BenchOptions => {
  const value = (name: string): string | undefined => {
    const i = args.indexOf(name);
    if (i < 0) return undefined;
    const v = args[i + 1];
    if (v === undefined || v.startsWith("--")) throw new Error(`${name} needs a value`);
    return v;
  };
  const int = (name: string, fallback: number, min = 1): number => {
    const v = value(name);
    if (v === undefined) return fallback;
    const n = Number(v);
    if (!Number.isInteger(n) || n < min) throw new Error(`${name} must be an integer >= ${min}, got '${v}'`);
    return n;
  };
  const known = new Set([
    "--json",
    "--no-blas",
    "--stage",
    "--backend",
    "--threads",
    "--reps",
    "--arch",
    "--width",
    "--batch",
    "--crops",
    "--hidden",
    "--out",
    "--prototypes",
    "--procs",
    "--sync-bn",
    "--precision",
    "--method",
  ]);
  for (const a of args) {
    if (a.startsWith("--") && !known.has(a)) {
      throw new Error(`unknown flag ${a} (known: ${[...known].join(" ")})`);
    }
  }
  const stage = value("--stage");
  if (stage !== undefined && !(stageNames as readonly string[]).includes(stage)) {
    throw new Error(`--stage: unknown stage '${stage}' (one of ${stageNames.join(", ")})`);
  }
  const backend = value("--backend") ?? "wasm";
  if (!(backendNames as readonly string[]).includes(backend)) {
    throw new Error(`--backend: unknown backend '${backend}' (one of ${backendNames.join(", ")})`);
  }
  const syncBn = value("--sync-bn") ?? "true";
  if (syncBn !== "true" && syncBn !== "false") throw new Error(`--sync-bn: true or false, got '${syncBn}'`);
  const precision = value("--precision") ?? "fp32";
  if (!(PrecisionChoices.literals as readonly string[]).includes(precision)) {
    throw new Error(`--precision: fp32, bf16 or auto, got '${precision}'`);
  }
  const procs = int("--procs", 1);
  const batch = int("--batch", 64);
  if (batch % procs !== 0) {
    throw new Error(
      `--batch ${batch} does not split evenly over ${procs} processes: use a multiple of ${procs}`,
    );
  }
  const method = value("--method") ?? "swav";
  if (!(MethodName.literals as readonly string[]).includes(method)) {
    throw new Error(`--method: swav, deepclusterv2 or simclr, got '${method}'`);
  }
  if (method !== "swav" && (stage !== "step" || procs > 1)) {
    throw new Error(
      `--method ${method} times --stage step in one process only: add --stage step, drop --procs`,
    );
  }
  const arch = value("--arch") ?? "resnet18";
  if (arch !== "resnet18" && arch !== "resnet34" && arch !== "resnet50") {
    throw new Error(`--arch: resnet18, resnet34 or resnet50, got '${arch}'`);
  }
  return {
    json: args.includes("--json"),
    blas: !args.includes("--no-blas"),
    stages: stage === undefined ? stageNames : [stage as StageName],
    backend: backend as BackendName,
    threads: int("--threads", defaultThreads()),
    reps: int("--reps", 5),
    arch,
    width: int("--width", 16),
    batch,
    crops: parseCrops(value("--crops") ?? "2x32"),
    hidden: int("--hidden", 2048, 0),
    out: int("--out", 128),
    prototypes: int("--prototypes", 3000),
    procs,
    syncBn: syncBn === "true",
    threadsGiven: value("--threads") !== undefined,
    precision: precision as PrecisionChoice,
    method: method as MethodName,
  };
};

const median = (xs: readonly number[]): number => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[s.length >> 1]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
};

/**
 * Median wall time of `run` over `reps` runs after a warm-up; `run` must finish its work (read a value).
 * The warm-up is one run, repeated up to 20 times while it has taken under half a second: a cheap stage's
 * JavaScript (decode, the Sinkhorn host loops) reaches V8's optimising tier only after tens of calls, as it
 * does in training.
 */
const timeMedian = async (reps: number, run: () => Promise<void>): Promise<number> => {
  const warmStart = performance.now();
  // With several processes they agree on each further warm-up run: each run may hold collectives.
  const comm = activeCommunicator();
  const more = (wanted: boolean) => comm.size === 1 ? wanted : everyRankHasBatch(wanted, comm);
  for (let i = 0; i < 20 && (i === 0 || more(performance.now() - warmStart < 500)); i++) await run();
  const times: number[] = [];
  for (let i = 0; i < reps; i++) {
    const t0 = performance.now();
    await run();
    times.push(performance.now() - t0);
  }
  return median(times);
};

/** Waits for every tensor's data (makes sure the backend ran), then frees them. */
const settle = async (tensors: readonly tf.Tensor[]): Promise<void> => {
  await Promise.all(tensors.map((t) => t.data()));
  tf.dispose(tensors as tf.Tensor[]);
};

/** The run config the step uses (the pretrain pipeline's own parts). */
export const benchRunConfig = (o: BenchOptions): RunConfig => {
  return Effect.runSync(decodeRunConfig({
    multicrop: {
      nmbCrops: o.crops.map(([n]) => n),
      sizeCrops: o.crops.map(([, s]) => s),
      // The CIFAR-like profile: large crops area (0.14, 1), small ones (0.08, 0.4).
      minScaleCrops: o.crops.map((_, g) => (g === 0 ? 0.14 : 0.08)),
      maxScaleCrops: o.crops.map((_, g) => (g === 0 ? 1 : 0.4)),
      // Blur off, as the small-image profile (stages/multicrop.ts smallImageProfile) and the torch reference.
      blur: false,
    },
    model: {
      arch: o.arch,
      width: o.width,
      stem: "cifar",
      hidden: o.hidden,
      out: o.out,
      prototypes: o.prototypes,
    },
    swav: { cropsForAssign: [0, 1].filter((i) => i < o.crops.reduce((a, [n]) => a + n, 0)) },
    train: { batchSize: o.batch, method: o.method },
  }, "bench"));
};

export interface StageResult {
  readonly stage: StageName;
  readonly ms: number;
  readonly images_per_s: number;
  readonly reps: number;
}

/** One stage's timing context: model, data, optimiser, built once and shared by the stages. */
export interface Fixture {
  readonly config: RunConfig;
  readonly model: SwavModel;
  readonly variables: Record<string, tf.Variable>;
  readonly crops: tf.Tensor4D[];
  readonly optimiser: LarcSgd;
  readonly dispose: () => void;
}

/** The benchmark's model, random crops and optimiser (`fused`: the one-pass LARC-SGD where available). */
export const makeFixture = (o: BenchOptions, options: { fused?: boolean } = {}): Fixture => {
  const config = benchRunConfig(o);
  const model = makeSwavModel(config.model, 1);
  const variables = Object.fromEntries(
    model.params.filter((p) => p.trainable).map((p) => [p.name, p.variable]),
  );
  const crops = o.crops.map(([n, s]) =>
    tf.randomNormal([n * o.batch, s, s, 3], 0, 1, "float32", 7 + s) as tf.Tensor4D
  );
  const optimiser = new LarcSgd({
    momentum: 0.9,
    weightDecay: 1e-6,
    trustCoefficient: 0.001,
    eps: 1e-8,
    clip: false,
  }, options.fused ?? true);
  return {
    config,
    model,
    variables,
    crops,
    optimiser,
    dispose: () => {
      optimiser.dispose();
      tf.dispose(crops);
      disposeModel(model);
    },
  };
};

/**
 * One whole training step on the fixture, as the pretrain pipeline runs it: normalise the
 * prototypes, forward, codes, loss, backward, LARC-SGD update; resolves once the update has run.
 */
export const trainStep = async (
  fixture: Fixture,
  parts: ReturnType<typeof swavTape>,
  optimiser: LarcSgd = fixture.optimiser,
): Promise<void> => {
  const { model, crops, variables } = fixture;
  const variableList = Object.values(variables);
  normalisePrototypes(model.param(PROTOTYPES_WEIGHT));
  const tape = forwardBackward(parts, crops, variableList);
  // Data parallel (bench --procs): the global loss, gradients averaged over the processes in buckets.
  const comm = activeCommunicator();
  const local = (await tape.loss.data())[0]!;
  const loss = comm.size > 1 ? meanOverRanks(local, comm) : local;
  if (!Number.isFinite(loss)) throw new Error(`bench step: loss ${loss}`);
  let grads: tf.NamedTensorMap = {};
  for (const [name, variable] of Object.entries(variables)) {
    const g = tape.grads[variable.name];
    if (g !== undefined) grads[name] = g;
  }
  const averaged = comm.size > 1 ? await averageGradients(grads, comm) : undefined;
  if (averaged !== undefined) grads = averaged.grads;
  optimiser.step(variables, grads, 0.01);
  tf.dispose([
    tape.loss,
    tape.embeddings,
    ...tape.codes,
    ...Object.values(tape.grads),
    ...(averaged?.created ?? []),
  ]);
  await variableList[0]!.data();
};

/** Demo-like 32x32 PNGs, encoded once (decode cost is per image, independent of content type). */
const pngBatch = async (count: number, size: number): Promise<Uint8Array[]> => {
  const out: Uint8Array[] = [];
  for (let i = 0; i < count; i++) {
    const pixels = renderDemoImage(i % 10, size, rngFor(3, 0, i));
    const image = new Image(size, size);
    for (let p = 0; p < size * size; p++) {
      image.bitmap[p * 4] = pixels[p * 3]!;
      image.bitmap[p * 4 + 1] = pixels[p * 3 + 1]!;
      image.bitmap[p * 4 + 2] = pixels[p * 3 + 2]!;
      image.bitmap[p * 4 + 3] = 255;
    }
    out.push(await image.encode());
  }
  return out;
};

/** Runs the chosen stages and returns their results in order. */
export const runBench = async (
  o: BenchOptions,
  onResult: (r: StageResult) => void = () => {},
): Promise<StageResult[]> => {
  const results: StageResult[] = [];
  const report = (stage: StageName, ms: number) => {
    const r = {
      stage,
      ms: Number(ms.toFixed(3)),
      images_per_s: Number((o.batch / (ms / 1000)).toFixed(2)),
      reps: o.reps,
    };
    results.push(r);
    onResult(r);
  };
  const wants = (s: StageName) => o.stages.includes(s);
  const needsModel = o.stages.some((s) => s !== "decode" && s !== "multicrop");
  const fixture = needsModel ? makeFixture(o) : undefined;
  if (fixture !== undefined && o.method !== "swav") {
    // Another method's step (bench/method_step.ts): the only stage it times.
    const method = benchMethod(fixture, o.batch);
    try {
      report("step", await timeMedian(o.reps, () => methodBenchStep(fixture, method, o.batch)));
    } finally {
      fixture.dispose();
    }
    return results;
  }
  const config = fixture?.config ?? benchRunConfig(o);
  const parts = fixture === undefined ? undefined : swavTape(fixture.model, config, o.batch);
  const layout = {
    batchSize: o.batch,
    nmbCrops: config.multicrop.nmbCrops,
    cropsForAssign: config.swav.cropsForAssign,
  };
  try {
    if (wants("decode")) {
      const pngs = await pngBatch(o.batch, 32);
      report(
        "decode",
        await timeMedian(o.reps, async () => {
          for (const bytes of pngs) await decodeImagePromise(bytes);
        }),
      );
    }
    if (wants("multicrop")) {
      const images = await Promise.all((await pngBatch(o.batch, 32)).map((b) => decodeImagePromise(b)));
      const multicrop = Schema.decodeUnknownSync(MulticropConfig)(config.multicrop);
      let epoch = 0;
      report(
        "multicrop",
        await timeMedian(o.reps, async () => {
          epoch++;
          const samples = images.map((image, i) => multicropSample(image, multicrop, rngFor(5, epoch, i)));
          await settle(collateCrops(samples, multicrop));
        }),
      );
    }
    if (fixture === undefined || parts === undefined) return results;
    const { model, crops, variables, optimiser } = fixture;
    const variableList = Object.values(variables);
    // Scores of the current model (for the sinkhorn and loss stages: realistic values).
    const scores = tf.tidy(() => modelForward(model, crops, { training: false }).scores!);
    try {
      let forwardMs: number | undefined;
      if (wants("encode_forward") || wants("encode_backward")) {
        forwardMs = await timeMedian(o.reps, async () => {
          const out = modelForward(model, crops, { training: true });
          await settle([out.scores!, out.embeddings, out.features]);
        });
        if (wants("encode_forward")) report("encode_forward", forwardMs);
      }
      if (wants("encode_backward")) {
        const upstream = tf.randomNormal(scores.shape, 0, 1 / scores.size, "float32", 11);
        const both = await timeMedian(o.reps, async () => {
          // The training step's backward (pipelines/swav_step.ts).
          const { value, grads } = leanVariableGrads(
            () => tf.sum(tf.mul(modelForward(model, crops, { training: true }).scores!, upstream)),
            variableList,
          );
          await settle([value, ...Object.values(grads)]);
        });
        upstream.dispose();
        report("encode_backward", Math.max(0, both - forwardMs!));
      }
      if (wants("sinkhorn")) {
        report(
          "sinkhorn",
          await timeMedian(o.reps, async () => {
            await settle(assignmentCodes(scores, { ...layout, epsilon: 0.05, iterations: 3 }));
          }),
        );
      }
      if (wants("swapped_loss")) {
        const codes = assignmentCodes(scores, { ...layout, epsilon: 0.05, iterations: 3 });
        const lossAndGrad = tf.valueAndGrad((s: tf.Tensor) =>
          swappedLossFromCodes(s as tf.Tensor2D, codes, { ...layout, temperature: 0.1 })
        );
        report(
          "swapped_loss",
          await timeMedian(o.reps, async () => {
            const { value, grad } = lossAndGrad(scores);
            await settle([value, grad]);
          }),
        );
        tf.dispose(codes);
      }
      if (wants("optimise")) {
        // Gradients of the right shapes and scale (a small fraction of each parameter).
        const grads: tf.NamedTensorMap = Object.fromEntries(
          Object.entries(variables).map(([name, v], i) => [
            name,
            tf.randomNormal(v.shape, 0, 1e-3, "float32", 100 + i),
          ]),
        );
        report(
          "optimise",
          await timeMedian(o.reps, async () => {
            optimiser.step(variables, grads, 0.01);
            // Reading one small variable waits for the queued updates (wasm runs them synchronously).
            await variableList[variableList.length - 1]!.data();
          }),
        );
        tf.dispose(Object.values(grads));
      }
      if (wants("step")) {
        const comm = activeCommunicator();
        report(
          "step",
          // With several processes each timed step starts together: the time is the data-parallel step's.
          await timeMedian(o.reps, () => {
            comm.barrier();
            return trainStep(fixture, parts);
          }),
        );
      }
    } finally {
      scores.dispose();
    }
  } finally {
    fixture?.dispose();
  }
  return results;
};

const describe = (o: BenchOptions): string =>
  `${o.arch} cifar stem, width ${o.width}, batch ${o.batch}, crops ${
    o.crops.map(([n, s]) => `${n}x${s}`).join("+")
  }, head ${o.hidden}/${o.out}, ${o.prototypes} prototypes, LARC-SGD, method ${o.method}`;

if (import.meta.main) {
  if (Deno.args.includes("--help") || Deno.args.includes("-h")) {
    console.log(benchUsage);
    Deno.exit(0);
  }
  let global: BenchOptions;
  try {
    global = parseBenchArgs(Deno.args);
  } catch (error) {
    console.error(`bench: ${(error as Error).message}`);
    Deno.exit(2);
  }
  if (shouldLaunch(global.procs)) {
    // This process only starts mpiexec, which runs this same command as --procs ranks.
    const code = await Effect.runPromise(
      launchUnderMpi({
        procs: global.procs,
        threads: global.threadsGiven ? global.threads : undefined,
        script: new URL(import.meta.url).pathname,
        args: Deno.args,
      }).pipe(Effect.catch((error) => Effect.sync(() => (console.error(`bench: ${error.message}`), 1)))),
    );
    Deno.exit(code);
  }
  const communicator = await Effect.runPromise(
    Effect.scoped(Effect.service(CommunicatorService)).pipe(
      Effect.provide(CommunicatorService.auto),
      Effect.result,
    ),
  );
  if (communicator._tag === "Failure") {
    console.error(`bench: ${communicator.failure.message}`);
    Deno.exit(1);
  }
  const comm = communicator.success;
  // Each rank times its share of the global batch; rank 0 reports for the job.
  const options: BenchOptions = { ...global, batch: global.batch / comm.size };
  const lead = comm.rank === 0;
  // The benchmark decodes PNGs: only the native kernels would speed it up.
  await Effect.runPromise(
    announceSpeedupHint({ backend: options.backend, jpeg: false, nativeOff: !options.blas }),
  );
  const resolved = resolvePrecision(options.blas ? options.precision : "fp32", options.backend);
  if (resolved.note !== undefined && lead) console.error(`bench: ${resolved.note}`);
  // The backend and its kernel settings for the whole run, released (variables disposed) at the end.
  const runtime = ManagedRuntime.make(
    Layer.merge(
      TensorBackend.layer(options.backend, {
        threads: options.threads,
        blas: options.blas,
        syncBatchNorm: options.syncBn,
        precision: resolved.precision,
      }),
      CommunicatorService.auto,
    ),
  );
  const { name: backend, settings } = await runtime.runPromise(Effect.service(TensorBackend));
  const blas = blasInfo();
  const header = {
    backend,
    threads: options.threads,
    blas: blas.active ? blas.library : "off",
    dnnl: blas.active && dnnlInfo().active ? dnnlInfo().library : "off",
    tfjs: tf.version.tfjs,
    config: describe(global),
    fastConv2DBackpropInput: settings.fastConv2DBackpropInput,
  };
  if (!options.json && lead) {
    console.log(
      `${
        comm.size > 1 ? `procs ${comm.size}, sync-bn ${options.syncBn}, ` : ""
      }backend ${backend}, blas ${header.blas}, dnnl ${header.dnnl}, threads ${options.threads}, precision ${settings.precision}, reps ${options.reps}\n${header.config}\n`,
    );
    console.log(`| ${"stage".padEnd(16)} | ${"ms".padStart(9)} | ${"images/s".padStart(9)} |`);
    console.log(`| ${"-".repeat(16)} | --------: | --------: |`);
  }
  const results = await runBench(options, (local) => {
    if (!lead) return;
    // Every rank works at once on its share: the job's throughput counts the global batch.
    const r = { ...local, images_per_s: Number((local.images_per_s * comm.size).toFixed(2)) };
    if (options.json) {
      console.log(
        JSON.stringify({
          ...r,
          backend,
          threads: options.threads,
          blas: header.blas,
          dnnl: header.dnnl,
          precision: settings.precision,
          ...(comm.size > 1 ? { procs: comm.size, sync_bn: options.syncBn } : {}),
        }),
      );
    } else {
      console.log(
        `| ${r.stage.padEnd(16)} | ${r.ms.toFixed(2).padStart(9)} | ${
          r.images_per_s.toFixed(1).padStart(9)
        } |`,
      );
    }
  });
  const step = results.find((r) => r.stage === "step");
  if (!options.json && lead && step !== undefined && results.length > 1) {
    console.log("\nshare of step time per stage (stages timed on their own):");
    for (const r of results) {
      if (r.stage === "step" || r.stage === "decode" || r.stage === "multicrop") continue;
      console.log(`  ${r.stage.padEnd(16)} ${((100 * r.ms) / step.ms).toFixed(1).padStart(5)} %`);
    }
  }
  await runtime.dispose();
}
