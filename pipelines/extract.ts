/**
 * Feature extraction: the frozen backbone in eval mode (BatchNorm with running
 * statistics), global-average-pooled features for every sample of a source,
 * in source order, with their labels.
 *
 *   source -> decode -> eval transform (resize, centre crop, normalise) -> batches
 *          -> backbone (eval) -> pooled features [N, D]
 */
import * as tf from "@tensorflow/tfjs";
import { Effect, Stream } from "effect";
import { type LoaderError, makeLoader } from "../data/loader.ts";
import type { DecodeError } from "../data/image_codec.ts";
import type { Tensor2D } from "../backend/tensor_types.ts";
import { evalPrepare } from "../stages/multicrop.ts";
import type { DataSource } from "../data/sources.ts";
import { backboneForward } from "../models/resnet.ts";
import type { SwavModel } from "../models/model.ts";

/** How `extractFeatures` prepares the images (the eval transform) and batches them. */
export interface ExtractOptions {
  /** Side of the (square) input the backbone sees. */
  readonly size: number;
  /** Per-channel mean subtracted after scaling to [0, 1]. */
  readonly mean: readonly number[];
  /** Per-channel standard deviation divided by. */
  readonly std: readonly number[];
  /** Shorter side after resizing, before the centre crop (defaults to `size`). */
  readonly resize?: number;
  /** Samples per forward pass (default 256). */
  readonly batchSize?: number;
  /** Loader workers (default 0: decode on this thread). */
  readonly workers?: number;
  /** Loader seed (default 0; the eval transform draws nothing random). */
  readonly seed?: number;
  /** Skip undecodable samples (default) or fail. */
  readonly onError?: "skip" | "fail";
  /** Called after each batch with (samples done, total). */
  readonly onProgress?: (done: number, total: number) => void;
}

/** Pooled backbone features of a source with each row's label and source index. */
export interface Features {
  /** [N, D] pooled backbone features (owned by the caller). */
  readonly features: Tensor2D;
  /** Label per row (-1 for unlabelled data). */
  readonly labels: Int32Array;
  /** Source index per row (skipped samples are absent). */
  readonly indices: Int32Array;
}

/** How `extractFeatures` fails: the loader cannot read the source, or (`onError: "fail"`) an image does not decode. */
export type ExtractFeaturesError = DecodeError | LoaderError;

/**
 * Extracts pooled backbone features of every sample of `source`.
 *
 * @example Features of a tiny generated test split from a small random ResNet-18
 * ```ts
 * import { Effect, Schema } from "effect";
 * import assert from "node:assert/strict";
 * import { extractFeatures, initBackend, makeSwavModel, ModelConfig, openSource, writeDemoDataset } from "@swav/swav-ts";
 *
 * await initBackend("cpu");
 * const folder = await Deno.makeTempDir();
 * await writeDemoDataset({ folder, perClassTrain: 1, perClassTest: 1, size: 16, seed: 1 });
 * using model = makeSwavModel(
 *   Schema.decodeUnknownSync(ModelConfig)({ arch: "resnet18", width: 8, stem: "cifar", hidden: 0, out: 16, prototypes: 10 }),
 * );
 * const { features, labels } = await Effect.runPromise(Effect.gen(function* () {
 *   const source = yield* openSource(`${folder}:test`);
 *   return yield* extractFeatures(model, source, { size: 16, mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25] });
 * }));
 * assert.deepEqual(features.shape, [10, 64]); // 10 images, 8 x 8 channels after the last ResNet stage
 * assert.deepEqual([...labels].sort(), [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
 * features.dispose();
 * await Deno.remove(folder, { recursive: true });
 * ```
 */
export const extractFeatures = (
  model: SwavModel,
  source: DataSource,
  options: ExtractOptions,
): Effect.Effect<Features, ExtractFeaturesError> =>
  Effect.scoped(Effect.gen(function* () {
    const channels = model.config.inputChannels;
    const batchSize = options.batchSize ?? 256;
    const loader = yield* makeLoader({
      source,
      prepare: evalPrepare({
        size: options.size,
        channels,
        mean: [...options.mean],
        std: [...options.std],
        ...(options.resize === undefined ? {} : { resize: options.resize }),
      }),
      seed: options.seed ?? 0,
      batchSize,
      dropLast: false,
      shuffle: false,
      workers: options.workers ?? 0,
      onError: options.onError ?? "skip",
    });
    const parts: tf.Tensor2D[] = [];
    const labels: number[] = [];
    const indices: number[] = [];
    yield* Effect.addFinalizer(() => Effect.sync(() => tf.dispose(parts)));
    yield* loader.epoch(0).pipe(
      Stream.runForEach((batch) =>
        Effect.sync(() => {
          const n = batch.views.length;
          const pixels = new Float32Array(n * options.size * options.size * channels);
          batch.views.forEach((views, i) => pixels.set(views[0]!, i * views[0]!.length));
          parts.push(tf.tidy(() => {
            const x = tf.tensor4d(pixels, [n, options.size, options.size, channels]);
            return backboneForward(model.plan, model.param, x, { training: false });
          }));
          labels.push(...batch.labels);
          indices.push(...batch.indices);
          options.onProgress?.(indices.length, source.length);
        })
      ),
    );
    const features = parts.length === 0
      ? tf.zeros([0, model.plan.featureDim]) as tf.Tensor2D
      : tf.concat(parts, 0) as tf.Tensor2D;
    return {
      features,
      labels: Int32Array.from(labels),
      indices: Int32Array.from(indices),
    } satisfies Features;
  }));
