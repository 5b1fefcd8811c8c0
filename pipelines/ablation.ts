/**
 * The paper's multi-crop ablation as one task: {swav, deepclusterv2, simclr} x
 * {two crops, multi-crop (2 + 4 small crops at half the side)}, one run folder
 * per cell under one budget (the same recipe, epochs, batch, width and seed),
 * each cell scored by kNN and the fast linear probe on its features; resumable
 * cell by cell (a finished cell's `cell.json` is reused, an unfinished one
 * resumes from its checkpoint). A sweep (pipelines/sweep.ts) under the budget;
 * writes `ablation.json`, `ablation.md` and `ablation.html`.
 */
import { Effect } from "effect";
import { mergeConfig, type MethodName, type RunConfigInput } from "../config/config.ts";
import { factsOf } from "../config/data_defaults.ts";
import { recipeConfig } from "../config/recipes.ts";
import { openSource } from "../data/sources.ts";
import { type PretrainHooks, withSplit } from "./pretrain.ts";
import { resolveSourceSpec } from "./sources.ts";
import { gridCells, runSweep, type SweepAxis, type SweepCellResult } from "./sweep.ts";
import { gridReportHtml } from "./sweep_report.ts";

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

/** One ablation cell's scores: a sweep cell's, named by method, crops and seed instead of its settings. */
export interface CellResult extends Omit<SweepCellResult, "name" | "settings"> {
  readonly method: MethodName;
  readonly crops: AblationCrops;
  readonly seed: number;
}

/** A finished cell was trained under another budget than the one asked for now (the sweep's error). */
export { SweepCellChanged as AblationBudgetChanged } from "./sweep.ts";

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

/**
 * Runs (or resumes) every cell, then writes the table; the cells' results in grid order. The grid
 * is a sweep (pipelines/sweep.ts) over train.seed x train.method x multicrop under the budget.
 */
export const runAblation = (options: AblationOptions) =>
  Effect.gen(function* () {
    const source = yield* openSource(yield* resolveSourceSpec(withSplit(options.data, "train")));
    const first = yield* source.read(0);
    const side = Math.min(first.image.width, first.image.height);
    const facts = factsOf(source, side);
    const seeds = Array.from({ length: options.seeds }, (_, s) => s);
    // The axes' values, seed outermost; the crops axis sets the multicrop section as a whole.
    const axes: SweepAxis[] = [
      { key: "train.seed", path: ["train", "seed"], values: seeds.map((s) => 31 + s) },
      { key: "train.method", path: ["train", "method"], values: [...ABLATION_METHODS] },
      { key: "multicrop", path: ["multicrop"], values: ABLATION_CROPS.map((c) => cropsFor(c, side)) },
    ];
    const cellOf = new Map<string, { method: MethodName; crops: AblationCrops; seed: number }>();
    const cells = gridCells(axes, ([seedValue, method, crops]) => {
      const seed = (seedValue as number) - 31;
      const label = ABLATION_CROPS[axes[2]!.values.indexOf(crops)]!;
      const name = cellName(method as MethodName, label, seed);
      cellOf.set(name, { method: method as MethodName, crops: label, seed });
      return name;
    });
    const base = mergeConfig(
      mergeConfig(recipeConfig("small-data", options.epochs), { train: { batchSize: ABLATION_BATCH } }),
      mergeConfig(options.base ?? {}, {
        data: { source: withSplit(options.data, "train") },
        multicrop: facts.channels === 1 ? { channels: 1 } : {},
        model: facts.channels === 1 ? { inputChannels: 1 } : {},
        train: { epochs: options.epochs },
      }),
    );
    const asCell = (c: SweepCellResult): CellResult => ({
      ...cellOf.get(c.name)!,
      knnTop1: c.knnTop1,
      linearTop1: c.linearTop1,
      steps: c.steps,
      seconds: c.seconds,
      reused: c.reused,
      config: c.config,
    });
    const onCell = options.hooks?.onCell;
    const sweep = yield* runSweep({
      base,
      cells,
      facts,
      out: options.out,
      probeEpochs: options.probeEpochs,
      label: "ablation",
      hooks: { ...options.hooks, onCell: (c) => onCell?.(asCell(c)) },
    });
    const results = sweep.map(asCell);
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
    const html = yield* gridReportHtml({
      title: "multi-crop ablation",
      heading: "Multi-crop ablation",
      axes: { group: "method", series: "crops" },
      bars: table.flatMap((r) => [
        { group: r.method, series: "2 crops", knn: 100 * r.knn.twoCrops, linear: 100 * r.linear.twoCrops },
        {
          group: r.method,
          series: "multi-crop",
          knn: 100 * r.knn.multiCrop,
          linear: 100 * r.linear.multiCrop,
        },
      ]),
      header: [
        "method",
        "kNN 2 crops",
        "kNN multi-crop",
        "gain",
        "linear 2 crops",
        "linear multi-crop",
        "gain",
      ],
      rows: table.map((r) => [
        r.method,
        pct(r.knn.twoCrops),
        pct(r.knn.multiCrop),
        signed(r.knn.gain),
        pct(r.linear.twoCrops),
        pct(r.linear.multiCrop),
        signed(r.linear.gain),
      ]),
    });
    yield* Effect.promise(() => Deno.writeTextFile(path, html));
  });
