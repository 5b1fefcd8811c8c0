/**
 * The paper's multi-crop ablation as one task: {swav, deepclusterv2, simclr} x
 * {two crops, multi-crop (2 + 4 small crops at half the side)}, one run folder
 * per cell under one budget (the same recipe, epochs, batch, width and seed),
 * each cell scored by kNN and the fast linear probe on its features; resumable
 * cell by cell (a finished cell's `cell.json` is reused, an unfinished one
 * resumes from its checkpoint). Writes `ablation.json` and `ablation.md`.
 */
import { Effect, Schema } from "effect";
import { TensorBackend } from "../backend/tensor_backend.ts";
import {
  decodeRunConfig,
  mergeConfig,
  type MethodName,
  type RunConfig,
  type RunConfigInput,
} from "../config/config.ts";
import { checkFitsBackend } from "../stages/encode.ts";
import { factsOf, withDataDefaults } from "../config/data_defaults.ts";
import { recipeConfig } from "../config/recipes.ts";
import { openSource } from "../data/sources.ts";
import { latestCheckpoint } from "./checkpoint.ts";
import { evaluate } from "./evaluate.ts";
import { pretrain, type PretrainHooks, withSplit } from "./pretrain.ts";
import { escapeHtml } from "./report_html.ts";
import { groupedBarSpec, renderSvg } from "./report_plots.ts";
import { resolveSourceSpec } from "./sources.ts";

export const ABLATION_METHODS: readonly MethodName[] = ["swav", "deepclusterv2", "simclr"];
export const ABLATION_CROPS = ["2", "2+4"] as const;
export type AblationCrops = typeof ABLATION_CROPS[number];
/** Every cell's batch: the multi-crop cells' 2 + 4 crops of 32 px at 256 would not fit the 4 GiB wasm heap. */
export const ABLATION_BATCH = 128;

export interface AblationOptions {
  /** A labelled SOURCE (kNN and the probe need labels). */
  readonly data: string;
  readonly epochs: number;
  readonly seeds: number;
  readonly out: string;
  /** Epochs of the fast linear probe on each cell's features. */
  readonly probeEpochs: number;
  /** Merged over the small-data recipe for every cell (tests use a tinier model). */
  readonly base?: RunConfigInput;
  readonly hooks?: PretrainHooks & { readonly onCell?: (cell: CellResult) => void };
}

export interface CellResult {
  readonly method: MethodName;
  readonly crops: AblationCrops;
  readonly seed: number;
  readonly knnTop1: number;
  readonly linearTop1: number;
  readonly steps: number;
  readonly seconds: number;
  /** The cell was finished by an earlier invocation and read back. */
  readonly reused: boolean;
  /** The cell's resolved config (JSON), so that a rerun with another budget does not reuse it. */
  readonly config: string;
}

/** A finished cell was trained under another budget than the one asked for now. */
export class AblationBudgetChanged
  extends Schema.TaggedError<AblationBudgetChanged>()("AblationBudgetChanged", {
    message: Schema.String,
  }) {}

/** The crop settings of a cell at the data's side: two crops, or two plus four at half the side. */
const cropsFor = (crops: AblationCrops, side: number) =>
  crops === "2" ? { nmbCrops: [2], sizeCrops: [side], minScaleCrops: [0.2], maxScaleCrops: [1] } : {
    nmbCrops: [2, 4],
    sizeCrops: [side, Math.max(8, Math.round(side / 2))],
    minScaleCrops: [0.2, 0.05],
    maxScaleCrops: [1, 0.2],
  };

const cellName = (method: MethodName, crops: AblationCrops, seed: number) =>
  `${method}-${crops === "2" ? "2crops" : "multicrop"}-seed${seed}`;

const readCell = (path: string) =>
  Effect.promise(async () => {
    try {
      return JSON.parse(await Deno.readTextFile(path)) as CellResult;
    } catch {
      return undefined;
    }
  });

/** Runs (or resumes) every cell, then writes the table; the cells' results in grid order. */
export const runAblation = (options: AblationOptions) =>
  Effect.gen(function* () {
    const source = yield* openSource(yield* resolveSourceSpec(withSplit(options.data, "train")));
    const first = yield* source.read(0);
    const side = Math.min(first.image.width, first.image.height);
    const facts = factsOf(source, side);
    // Every cell's config, validated and checked against the backend's memory before any cell trains.
    const backend = yield* TensorBackend;
    const cells: {
      method: MethodName;
      crops: AblationCrops;
      seed: number;
      dir: string;
      config: RunConfig;
    }[] = [];
    for (let seed = 0; seed < options.seeds; seed++) {
      for (const method of ABLATION_METHODS) {
        for (const crops of ABLATION_CROPS) {
          const dir = `${options.out}/${cellName(method, crops, seed)}`;
          const raw = mergeConfig(
            mergeConfig(recipeConfig("small-data", options.epochs), { train: { batchSize: ABLATION_BATCH } }),
            mergeConfig(options.base ?? {}, {
              data: { source: withSplit(options.data, "train") },
              multicrop: { ...cropsFor(crops, side), ...(facts.channels === 1 ? { channels: 1 } : {}) },
              model: facts.channels === 1 ? { inputChannels: 1 } : {},
              train: { method, seed: 31 + seed, out: dir, epochs: options.epochs },
            }),
          );
          const config = yield* decodeRunConfig(
            withDataDefaults(raw, facts),
            `ablation cell ${cellName(method, crops, seed)}`,
          );
          yield* checkFitsBackend(config.model, config.train.batchSize, config.multicrop, backend.name);
          cells.push({ method, crops, seed, dir, config });
        }
      }
    }
    const results: CellResult[] = [];
    for (const { method, crops, seed, dir, config } of cells) {
      const done = yield* readCell(`${dir}/cell.json`);
      if (done !== undefined && done.config !== JSON.stringify(config)) {
        return yield* new AblationBudgetChanged({
          message: `${dir} was trained with another budget (its cell.json records another config): ` +
            `use another --out, or the same --epochs and data`,
        });
      }
      if (done !== undefined) {
        const reused = { ...done, reused: true };
        results.push(reused);
        options.hooks?.onCell?.(reused);
        continue;
      }
      const started = performance.now();
      // An unfinished cell continues from its checkpoint; a new one starts fresh.
      const resume = (yield* latestCheckpoint(dir)) !== undefined;
      const run = yield* pretrain(config, { resume, ...(options.hooks ? { hooks: options.hooks } : {}) });
      const knn = yield* evaluate({ checkpoint: dir, method: "knn" });
      const linear = yield* evaluate({
        checkpoint: dir,
        method: "linear",
        protocol: "features",
        epochs: options.probeEpochs,
      });
      const cell: CellResult = {
        method,
        crops,
        seed,
        knnTop1: knn.top1,
        linearTop1: linear.top1,
        steps: run.steps,
        seconds: (performance.now() - started) / 1000,
        reused: false,
        config: JSON.stringify(config),
      };
      yield* Effect.promise(() => Deno.writeTextFile(`${dir}/cell.json`, JSON.stringify(cell)));
      results.push(cell);
      options.hooks?.onCell?.(cell);
    }
    const table = ablationTable(results);
    yield* Effect.promise(async () => {
      await Deno.writeTextFile(
        `${options.out}/ablation.json`,
        JSON.stringify({ cells: results, table }, null, 2),
      );
      await Deno.writeTextFile(`${options.out}/ablation.md`, ablationMarkdown(table));
    });
    yield* writeAblationHtml(`${options.out}/ablation.html`, table);
    return { cells: results, table };
  });

/** One row per method: mean top-1 (over seeds) with two crops, with multi-crop, and the gain. */
export interface AblationRow {
  readonly method: MethodName;
  readonly knn: { readonly twoCrops: number; readonly multiCrop: number; readonly gain: number };
  readonly linear: { readonly twoCrops: number; readonly multiCrop: number; readonly gain: number };
}

const mean = (xs: readonly number[]) => xs.reduce((a, b) => a + b, 0) / xs.length;

/** The paper's figure as a table: method x crops, and the gain from multi-crop. */
export const ablationTable = (cells: readonly CellResult[]): AblationRow[] =>
  ABLATION_METHODS.map((method) => {
    const of = (crops: AblationCrops, key: "knnTop1" | "linearTop1") =>
      mean(cells.filter((c) => c.method === method && c.crops === crops).map((c) => c[key]));
    const pair = (key: "knnTop1" | "linearTop1") => {
      const twoCrops = of("2", key);
      const multiCrop = of("2+4", key);
      return { twoCrops, multiCrop, gain: multiCrop - twoCrops };
    };
    return { method, knn: pair("knnTop1"), linear: pair("linearTop1") };
  });

const pct = (x: number) => (100 * x).toFixed(2);
const signed = (x: number) => `${x >= 0 ? "+" : ""}${(100 * x).toFixed(2)}`;

/** The table as Markdown (top-1 in %). */
export const ablationMarkdown = (table: readonly AblationRow[]): string =>
  [
    "| method | kNN 2 crops | kNN multi-crop | gain | linear 2 crops | linear multi-crop | gain |",
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ...table.map((r) =>
      `| ${r.method} | ${pct(r.knn.twoCrops)} | ${pct(r.knn.multiCrop)} | ${signed(r.knn.gain)} | ` +
      `${pct(r.linear.twoCrops)} | ${pct(r.linear.multiCrop)} | ${signed(r.linear.gain)} |`
    ),
  ].join("\n") + "\n";

/** The HTML report: kNN and linear top-1 as grouped bars (method x crops), and the table. */
const writeAblationHtml = (path: string, table: readonly AblationRow[]) =>
  Effect.gen(function* () {
    const chart = (key: "knn" | "linear", title: string) =>
      renderSvg(groupedBarSpec(
        table.flatMap((r) => [
          { method: r.method, crops: "2 crops", top1: 100 * r[key].twoCrops },
          { method: r.method, crops: "multi-crop", top1: 100 * r[key].multiCrop },
        ]),
        { field: "method", title: "method" },
        { field: "crops", title: "crops" },
        { field: "top1", title },
      ));
    const knn = yield* chart("knn", "kNN top-1 (%)");
    const linear = yield* chart("linear", "linear top-1 (%)");
    const rows = table.map((r) =>
      `<tr><td>${escapeHtml(r.method)}</td><td>${pct(r.knn.twoCrops)}</td><td>${pct(r.knn.multiCrop)}</td>` +
      `<td>${signed(r.knn.gain)}</td><td>${pct(r.linear.twoCrops)}</td><td>${pct(r.linear.multiCrop)}</td>` +
      `<td>${signed(r.linear.gain)}</td></tr>`
    );
    const html = `<!doctype html><html><head><meta charset="utf-8"><title>multi-crop ablation</title>
<style>body{font:14px/1.4 sans-serif;margin:1.5em auto;max-width:1000px;color:#222;padding:0 1em}
td,th{padding:2px 8px;text-align:right}td:first-child{text-align:left}</style></head><body>
<h1>Multi-crop ablation</h1><figure>${knn}</figure><figure>${linear}</figure>
<table><thead><tr><th>method</th><th>kNN 2 crops</th><th>kNN multi-crop</th><th>gain</th>
<th>linear 2 crops</th><th>linear multi-crop</th><th>gain</th></tr></thead><tbody>${
      rows.join("")
    }</tbody></table>
</body></html>`;
    yield* Effect.promise(() => Deno.writeTextFile(path, html));
  });
