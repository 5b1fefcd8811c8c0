/**
 * A grid of pretraining runs (`deno task sweep`, and the multi-crop ablation
 * built on it): every cell is the base config with its own settings merged
 * over it, validated (and checked against the backend's memory) before any
 * cell trains; one run folder per cell; each cell scored by kNN and the fast
 * linear probe on its backbone features. Resumable cell by cell: a finished
 * cell's `cell.json` is read back (refused if it records another config), an
 * unfinished one resumes from its last checkpoint.
 */
import { Effect, Schema } from "effect";
import { TensorBackend } from "../backend/tensor_backend.ts";
import {
  decodeRunConfig,
  InvalidConfig,
  mergeConfig,
  readRawConfig,
  type RunConfig,
} from "../config/config.ts";
import { type DataFacts, factsOf, withDataDefaults } from "../config/data_defaults.ts";
import { openSource } from "../data/sources.ts";
import { resolveSourceSpec } from "./sources.ts";
import { sweepMarkdown, writeSweepReport } from "./sweep_report.ts";
import { parseSetting, type Setting, settingsObject } from "../config/settings.ts";
import { checkFitsBackend } from "../stages/encode.ts";
import { latestCheckpoint } from "./checkpoint.ts";
import { evaluate } from "./evaluate.ts";
import { pretrain, type PretrainHooks } from "./pretrain.ts";

/** One axis of the grid: a config key and the values it takes (in order). */
export interface SweepAxis {
  readonly key: string;
  readonly path: readonly string[];
  readonly values: readonly unknown[];
}

/** One cell: its folder name under the sweep's out, and the settings merged over the base. */
export interface SweepCell {
  readonly name: string;
  readonly settings: readonly Setting[];
}

/** A finished cell (its `cell.json`). */
export interface SweepCellResult {
  readonly name: string;
  /** The cell's settings, key -> value. */
  readonly settings: Readonly<Record<string, unknown>>;
  readonly knnTop1: number;
  /** NaN when the sweep runs no linear probe. */
  readonly linearTop1: number;
  readonly steps: number;
  readonly seconds: number;
  /** The cell was finished by an earlier invocation and read back. */
  readonly reused: boolean;
  /** The cell's resolved config (JSON), so that a rerun with another budget does not reuse it. */
  readonly config: string;
}

/** A finished cell was trained under another config than the one asked for now. */
export class SweepCellChanged extends Schema.TaggedError<SweepCellChanged>()("SweepCellChanged", {
  message: Schema.String,
}) {}

/**
 * `KEY=V1|V2|...` (values as JSON, e.g. `multicrop.nmbCrops=[2]|[2,4]`), each value checked against
 * the schema as `--set` checks one; the axis, or the one-line reason it is not one.
 */
export const parseGridAxis = (text: string): SweepAxis | InvalidConfig => {
  const eq = text.indexOf("=");
  const key = text.slice(0, Math.max(eq, 0));
  const values: unknown[] = [];
  let path: readonly string[] = [];
  for (const part of eq < 0 ? [""] : text.slice(eq + 1).split("|")) {
    const checked = parseSetting(eq < 0 ? text : `${key}=${part}`, `--grid ${text}`);
    if (checked instanceof Error) return checked;
    path = checked.path;
    values.push(checked.value);
  }
  return { key, path, values };
};

/** A value as part of a folder name: its JSON without brackets, quotes or spaces (`[2,4]` -> `2,4`). */
const valueLabel = (value: unknown) =>
  JSON.stringify(value).replace(/[[\]{}" ]/g, "").replace(/[^A-Za-z0-9.,+=-]/g, "_").slice(0, 40);

/**
 * Every combination of the axes' values, the first axis outermost; each cell named after its values
 * (`nmbCrops-2,4_method-simclr`), unless `name` names it.
 */
export const gridCells = (
  axes: readonly SweepAxis[],
  name?: (values: readonly unknown[]) => string,
): SweepCell[] => {
  let combos: unknown[][] = [[]];
  for (const axis of axes) combos = combos.flatMap((combo) => axis.values.map((v) => [...combo, v]));
  const used = new Set<string>();
  return combos.map((values) => {
    const base = name?.(values) ??
      (axes.map((axis, i) => `${axis.path[axis.path.length - 1]}-${valueLabel(values[i])}`).join("_") ||
        "cell");
    // Two values may read the same once cleaned (e.g. "a b" and "ab"): the later one gets a number.
    let unique = base;
    for (let n = 2; used.has(unique); n++) unique = `${base}-${n}`;
    used.add(unique);
    return {
      name: unique,
      settings: axes.map((axis, i) => ({ key: axis.key, path: axis.path, value: values[i] })),
    };
  });
};

export interface SweepOptions {
  /** The raw config every cell starts from (a file's content, a recipe), before its settings. */
  readonly base: unknown;
  readonly cells: readonly SweepCell[];
  /** The data set's facts for its defaults (config/data_defaults.ts). */
  readonly facts: DataFacts;
  readonly out: string;
  /** Epochs of the fast linear probe on each cell's features (0: none). */
  readonly probeEpochs: number;
  /** Names the cells in errors ("sweep cell ..."). */
  readonly label?: string;
  readonly hooks?: PretrainHooks & { readonly onCell?: (cell: SweepCellResult) => void };
}

const readCell = (path: string) =>
  Effect.promise(async () => {
    try {
      return JSON.parse(await Deno.readTextFile(path)) as SweepCellResult;
    } catch {
      return undefined;
    }
  });

/** Every cell's resolved config, validated and checked against the backend before any cell trains. */
export const sweepConfigs = (options: SweepOptions) =>
  Effect.gen(function* () {
    const backend = yield* TensorBackend;
    const configs: { cell: SweepCell; dir: string; config: RunConfig }[] = [];
    for (const cell of options.cells) {
      const dir = `${options.out}/${cell.name}`;
      const raw = mergeConfig(
        mergeConfig(options.base, settingsObject(cell.settings)),
        { train: { out: dir } },
      );
      const config = yield* decodeRunConfig(
        withDataDefaults(raw, options.facts),
        `${options.label ?? "sweep"} cell ${cell.name}`,
      );
      yield* checkFitsBackend(config.model, config.train.batchSize, config.multicrop, backend.name);
      configs.push({ cell, dir, config });
    }
    return configs;
  });

/** Runs (or resumes) every cell, then scores it; the cells' results in grid order. */
export const runSweep = (options: SweepOptions) =>
  Effect.gen(function* () {
    const configs = yield* sweepConfigs(options);
    const results: SweepCellResult[] = [];
    for (const { cell, dir, config } of configs) {
      const done = yield* readCell(`${dir}/cell.json`);
      if (done !== undefined && done.config !== JSON.stringify(config)) {
        return yield* new SweepCellChanged({
          message: `${dir} was trained with another budget (its cell.json records another config): ` +
            `use another --out, or the same settings, epochs and data`,
        });
      }
      if (done !== undefined) {
        const reused = { ...done, linearTop1: done.linearTop1 ?? NaN, reused: true };
        results.push(reused);
        options.hooks?.onCell?.(reused);
        continue;
      }
      const started = performance.now();
      // An unfinished cell continues from its checkpoint; a new one starts fresh.
      const resume = (yield* latestCheckpoint(dir)) !== undefined;
      const run = yield* pretrain(config, { resume, ...(options.hooks ? { hooks: options.hooks } : {}) });
      const knn = yield* evaluate({ checkpoint: dir, method: "knn" });
      const linear = options.probeEpochs > 0
        ? (yield* evaluate({
          checkpoint: dir,
          method: "linear",
          protocol: "features",
          epochs: options.probeEpochs,
        }))
          .top1
        : NaN;
      const result: SweepCellResult = {
        name: cell.name,
        settings: Object.fromEntries(cell.settings.map((s) => [s.key, s.value])),
        knnTop1: knn.top1,
        linearTop1: linear,
        steps: run.steps,
        seconds: (performance.now() - started) / 1000,
        reused: false,
        config: JSON.stringify(config),
      };
      // JSON has no NaN: a sweep without the probe stores null there.
      yield* Effect.promise(() => Deno.writeTextFile(`${dir}/cell.json`, JSON.stringify(result)));
      results.push(result);
      options.hooks?.onCell?.(result);
    }
    return results;
  });

/** A sweep's source has no labels: its cells could not be scored. */
export class SweepNeedsLabels extends Schema.TaggedError<SweepNeedsLabels>()("SweepNeedsLabels", {
  message: Schema.String,
}) {}

/**
 * `deno task sweep`: the config file (with `--epochs` over it) as the base, the `--grid` axes
 * checked before anything runs, every cell validated, then run, scored and reported
 * (`sweep.json`, `sweep.md`, `sweep.html` in `out`).
 */
export const sweepFromFile = (options: {
  readonly config: string;
  readonly grid: readonly string[];
  readonly out: string;
  readonly epochs?: number;
  readonly probeEpochs: number;
  readonly hooks?: SweepOptions["hooks"];
}) =>
  Effect.gen(function* () {
    const axes: SweepAxis[] = [];
    for (const text of options.grid) {
      const axis = parseGridAxis(text);
      if (axis instanceof Error) return yield* axis;
      if (axes.some((a) => a.key === axis.key)) {
        return yield* new InvalidConfig({
          source: "--grid",
          message:
            `--grid ${text}: ${axis.key} is already an axis (give all its values in one --grid, separated by |)`,
        });
      }
      axes.push(axis);
    }
    const fileRaw = yield* readRawConfig(options.config);
    const base = mergeConfig(fileRaw, { train: { epochs: options.epochs } });
    const provisional = yield* decodeRunConfig(base, options.config);
    const source = yield* openSource(
      yield* resolveSourceSpec(provisional.data.source),
      provisional.data.channels === undefined ? {} : { channels: provisional.data.channels },
    );
    if (source.classes === undefined) {
      return yield* new SweepNeedsLabels({
        message:
          `${provisional.data.source} has no labels: a sweep scores each cell by kNN on labelled data ` +
          `(an IDX, CIFAR or class-folder source)`,
      });
    }
    const results = yield* runSweep({
      base,
      cells: gridCells(axes),
      facts: factsOf(source),
      out: options.out,
      probeEpochs: options.probeEpochs,
      ...(options.hooks ? { hooks: options.hooks } : {}),
    });
    yield* writeSweepReport(options.out, axes, results);
    return { axes, cells: results, table: sweepMarkdown(axes, results) };
  });
