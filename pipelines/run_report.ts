/**
 * What the run report shows, gathered from a run folder:
 *
 *   records (cheap, re-read live by the dashboard): config.json, metrics.jsonl, epochs.jsonl,
 *     events.jsonl, eval-*.json; a missing or half-written file reads as empty, never as an error
 *   model views (feature extraction, once per checkpoint): prototype usage of the test images,
 *     the retrieval grid at the last checkpoint and at random init, a seeded UMAP of test features
 *
 * Every sample is chosen by index arithmetic (evenly spaced), never at random, so the same run
 * folder gives the same report.
 */
import * as tf from "@tensorflow/tfjs";
import { encode as encodePng } from "fast-png";
import { Effect } from "effect";
import { UMAP } from "umap-js";
import type { RunConfig } from "../config/config.ts";
import type { RgbImage } from "../data/image_codec.ts";
import { type DataSource, openSource } from "../data/sources.ts";
import { headForward } from "../models/head.ts";
import type { SwavModel } from "../models/model.ts";
import { l2NormaliseRows } from "../models/prototypes.ts";
import { latestCheckpoint } from "./checkpoint.ts";
import { loadForEvaluation } from "./evaluate.ts";
import { extractFeatures } from "./extract.ts";
import { scopedModel, withSplit } from "./pretrain.ts";
import { resolveSourceSpec } from "./sources.ts";

export { parseJsonLines, readRunRecords, type RunRecords } from "./report_records.ts";

/** A small image, inlined as a PNG. */
export interface Thumb {
  readonly pngBase64: string;
  readonly label: string;
}

export interface ModelViews {
  readonly checkpoint: string;
  readonly step: number | undefined;
  readonly prototypes: number;
  /** Test images whose highest prototype score is prototype k, for each k. */
  readonly prototypeUsage: readonly number[];
  /** Where the test images come from; `fromTrain` when the source has no test split. */
  readonly testSource: string;
  readonly fromTrain: boolean;
  readonly testCount: number;
  readonly trainPool: number;
  readonly queries: readonly Thumb[];
  /** queries x neighbours, by backbone feature (cosine) of the last checkpoint / the random init. */
  readonly trained: readonly (readonly Thumb[])[];
  readonly random: readonly (readonly Thumb[])[];
  /** The seeded UMAP of the test features; label -1 where unlabelled. */
  readonly map: readonly { readonly x: number; readonly y: number; readonly label: number }[];
  readonly classes: readonly string[] | undefined;
}

/** How much of the data set a report's model views use: the retrieval grid's size and the images searched and mapped. */
export interface ViewOptions {
  /** Test images whose nearest neighbours the retrieval grid shows (default 8). */
  readonly queries?: number;
  /** Neighbours shown per query (default 8). */
  readonly neighbours?: number;
  /** Most training images searched for neighbours (default 4000). */
  readonly maxTrain?: number;
  /** Most test images used for prototype usage and the map (default 2000). */
  readonly maxTest?: number;
}

/** `count` indices spread evenly over [0, length). */
export const evenlySpaced = (length: number, count: number): number[] =>
  Array.from(
    { length: Math.min(length, count) },
    (_, i) => Math.floor((i * length) / Math.min(length, count)),
  );

const subset = (source: DataSource, indices: readonly number[]): DataSource => ({
  ...source,
  length: indices.length,
  fetch: (i) => source.fetch(indices[i]!),
  read: (i) => source.read(indices[i]!),
});

const toBase64 = (bytes: Uint8Array) => {
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  }
  return btoa(text);
};

/** Longest side of a thumbnail: the page shows 40 px; an ImageNet image inlined whole is ~300 KB. */
export const THUMB_SIDE = 64;

/** `image` shrunk so its longest side is at most `side`, each pixel the mean of the box it covers. */
export const thumbnail = (image: RgbImage, side = THUMB_SIDE): RgbImage => {
  const scale = Math.min(1, side / Math.max(image.width, image.height));
  if (scale === 1) return image;
  const width = Math.max(1, Math.round(image.width * scale));
  const height = Math.max(1, Math.round(image.height * scale));
  const data = new Uint8Array(width * height * 3);
  for (let y = 0; y < height; y++) {
    const y0 = Math.floor((y * image.height) / height);
    const y1 = Math.max(y0 + 1, Math.floor(((y + 1) * image.height) / height));
    for (let x = 0; x < width; x++) {
      const x0 = Math.floor((x * image.width) / width);
      const x1 = Math.max(x0 + 1, Math.floor(((x + 1) * image.width) / width));
      for (let c = 0; c < 3; c++) {
        let sum = 0;
        for (let v = y0; v < y1; v++) {
          for (let u = x0; u < x1; u++) sum += image.data[(v * image.width + u) * 3 + c]!;
        }
        data[(y * width + x) * 3 + c] = Math.round(sum / ((y1 - y0) * (x1 - x0)));
      }
    }
  }
  return { width, height, data };
};

const thumbOf = (source: DataSource, index: number) =>
  Effect.map(source.read(index), ({ image: full, label }): Thumb => {
    const image = thumbnail(full);
    return {
      pngBase64: toBase64(
        encodePng({ width: image.width, height: image.height, data: image.data, channels: 3 }),
      ),
      label: label >= 0 && source.classes !== undefined ? source.classes[label] ?? String(label) : "",
    };
  });

/** A seeded uniform generator in [0, 1) (mulberry32). */
export const seededRandom = (seed: number) => {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
};

const featuresOf = (model: SwavModel, source: DataSource, config: RunConfig) =>
  extractFeatures(model, source, {
    size: config.multicrop.sizeCrops[0]!,
    mean: config.multicrop.mean,
    std: config.multicrop.std,
    workers: config.data.workers,
    onError: config.data.onError,
  });

/** Row indices of the `k` most cosine-similar pool rows per query, skipping `exclude[q]` (the query itself). */
const nearest = async (
  queries: tf.Tensor2D,
  pool: tf.Tensor2D,
  k: number,
  exclude: readonly number[],
): Promise<number[][]> => {
  const sims = tf.tidy(() => tf.matMul(l2NormaliseRows(queries), l2NormaliseRows(pool), false, true));
  const values = await sims.data();
  sims.dispose();
  const n = pool.shape[0];
  return Array.from({ length: queries.shape[0] }, (_, q) => {
    const row = Array.from({ length: n }, (_, j) => j).filter((j) => j !== exclude[q]);
    // Ties broken by index, so the order never depends on the sort's stability.
    row.sort((a, b) => values[q * n + b]! - values[q * n + a]! || a - b);
    return row.slice(0, k);
  });
};

/**
 * The model views of a run folder's latest checkpoint, or undefined when it has none
 * (or its config has no readable data source).
 */
export const computeModelViews = (folder: string, options: ViewOptions = {}) =>
  Effect.scoped(Effect.gen(function* () {
    const queryCount = options.queries ?? 8;
    const neighbourCount = options.neighbours ?? 8;
    if ((yield* latestCheckpoint(folder)) === undefined) return undefined;
    const encoder = yield* loadForEvaluation(folder);
    const config = encoder.config;
    if (config === undefined) return undefined;
    const sourceOptions = { channels: config.model.inputChannels };
    const train = yield* openSource(
      yield* resolveSourceSpec(withSplit(config.data.source, "train")),
      sourceOptions,
    );
    const testSpec = config.data.testSource ?? withSplit(config.data.source, "test");
    const test = yield* Effect.flatMap(resolveSourceSpec(testSpec), (spec) => openSource(spec, sourceOptions))
      .pipe(
        Effect.option,
      );
    const fromTrain = test._tag === "None";
    const testSource = test._tag === "Some" ? test.value : train;

    const trainIndices = evenlySpaced(train.length, options.maxTrain ?? 4000);
    const testIndices = evenlySpaced(testSource.length, options.maxTest ?? 2000);
    const queryIndices = evenlySpaced(testSource.length, queryCount);
    const trainSet = subset(train, trainIndices);
    const random = yield* scopedModel(config.model, config.train.seed);
    const tensors: tf.Tensor[] = [];
    yield* Effect.addFinalizer(() => Effect.sync(() => tf.dispose(tensors)));
    const keep = <T extends tf.Tensor>(t: T) => (tensors.push(t), t);

    const queryFeatures = {
      trained: keep((yield* featuresOf(encoder.model, subset(testSource, queryIndices), config)).features),
      random: keep((yield* featuresOf(random, subset(testSource, queryIndices), config)).features),
    };
    const poolTrained = yield* featuresOf(encoder.model, trainSet, config);
    const poolRandom = yield* featuresOf(random, trainSet, config);
    keep(poolTrained.features);
    keep(poolRandom.features);
    // Without a test split the queries are training images: they are not their own neighbours.
    const exclude = queryIndices.map((q) => fromTrain ? trainIndices.indexOf(q) : -1);
    const near = {
      trained: yield* Effect.promise(() =>
        nearest(queryFeatures.trained, poolTrained.features, neighbourCount, exclude)
      ),
      random: yield* Effect.promise(() =>
        nearest(queryFeatures.random, poolRandom.features, neighbourCount, exclude)
      ),
    };
    const thumbsOf = (rows: number[][], pool: Int32Array) =>
      Effect.forEach(rows, (row) => Effect.forEach(row, (j) => thumbOf(train, trainIndices[pool[j]!]!)));

    const testFeatures = yield* featuresOf(encoder.model, subset(testSource, testIndices), config);
    keep(testFeatures.features);
    // Prototype usage of SwAV's single head (DeepCluster-v2's heads and SimCLR have none to show here).
    const scores = headForward(encoder.model.config, encoder.model.param, testFeatures.features, {
      training: false,
    }).scores;
    const k = typeof config.model.prototypes === "number" ? config.model.prototypes : 0;
    const prototypeUsage = new Array<number>(k).fill(0);
    if (scores !== undefined) {
      keep(scores);
      const assigned = yield* Effect.promise(() => keep(tf.argMax(scores, 1)).data());
      assigned.forEach((k) => prototypeUsage[k]! += 1);
    }

    const unit = keep(l2NormaliseRows(testFeatures.features));
    const rows = yield* Effect.promise(() => unit.array());
    const map = rows.length < 4 ? [] : new UMAP({
      nComponents: 2,
      nNeighbors: Math.min(15, rows.length - 1),
      minDist: 0.1,
      nEpochs: 200,
      random: seededRandom(config.train.seed),
    }).fit(rows).map(([x, y], i) => ({ x: x!, y: y!, label: testFeatures.labels[i]! }));

    return {
      checkpoint: encoder.path,
      step: encoder.step,
      prototypes: k,
      prototypeUsage,
      testSource: fromTrain ? train.path : testSpec,
      fromTrain,
      testCount: testIndices.length,
      trainPool: trainIndices.length,
      queries: yield* Effect.forEach(queryIndices, (q) => thumbOf(testSource, q)),
      trained: yield* thumbsOf(near.trained, poolTrained.indices),
      random: yield* thumbsOf(near.random, poolRandom.indices),
      map,
      classes: testSource.classes,
    } satisfies ModelViews;
  }));
