/**
 * Weighted k-nearest-neighbour classification on frozen features, as used by
 * lightly and solo-learn to follow SSL training: cosine similarity between
 * L2-normalised features, the k most similar training samples vote for their
 * label with weight exp(similarity / temperature).
 *
 * The similarity matrix is computed in chunks of test rows, so the memory held
 * at once is chunk x N, whatever the size of the test set.
 */
import * as tf from "@tensorflow/tfjs";
import { Effect, Schema } from "effect";
import type { RunConfig } from "../config/config.ts";
import type { DataSource } from "../data/sources.ts";
import type { SwavModel } from "../models/model.ts";
import { l2NormaliseRows } from "../models/prototypes.ts";
import { evalResizeFor } from "../data/eval_augment.ts";
import { extractFeatures } from "./extract.ts";
import type { DecodeError } from "../data/image_codec.ts";
import type { LoaderError } from "../data/loader.ts";

/** The weighted kNN vote's settings: how many neighbours vote, and how sharply similarity weighs them. */
export interface KnnOptions {
  /** Neighbours that vote (200 in the references). */
  readonly k: number;
  /** Vote weight exp(sim / temperature) (0.1 in the references). */
  readonly temperature: number;
  /** Number of classes (labels are 0 .. numClasses - 1). */
  readonly numClasses: number;
  /** Test rows per similarity chunk. */
  readonly chunkSize?: number;
}

/** kNN accuracy on the test features and the predicted class of each. */
export interface KnnResult {
  /** Fraction of test samples whose top-voted class is their label. */
  readonly top1: number;
  /** Fraction of test samples whose label is among the 5 top-voted classes. */
  readonly top5: number;
  /** Predicted class per test sample (argmax of the votes). */
  readonly predictions: Int32Array;
}

/** Features and labels that do not fit together (kNN, linear probe). */
export class EvaluationInputError extends Schema.TaggedError<EvaluationInputError>()("EvaluationInputError", {
  message: Schema.String,
}) {}

/**
 * Classifies `testFeatures` [M, D] by the labelled `trainFeatures` [N, D].
 * Features need not be normalised: both sides are L2-normalised here.
 *
 * @example Two labelled clusters; each test point takes the label of the cluster it is near
 * ```ts
 * import * as tf from "@tensorflow/tfjs";
 * import { Effect } from "effect";
 * import assert from "node:assert/strict";
 * import { initBackend, knnClassify } from "@swav/swav-ts";
 *
 * await initBackend("cpu");
 * const train = tf.tensor2d([[1, 0.1], [1, -0.1], [0.1, 1], [-0.1, 1]]);
 * const test = tf.tensor2d([[2, 0.3], [0.2, 3]]);
 * const result = await Effect.runPromise(
 *   knnClassify(train, new Int32Array([0, 0, 1, 1]), test, new Int32Array([0, 1]), {
 *     k: 3,
 *     temperature: 0.1,
 *     numClasses: 2,
 *   }),
 * );
 * assert.equal(result.top1, 1);
 * assert.deepEqual([...result.predictions], [0, 1]);
 * tf.dispose([train, test]);
 * ```
 */
export const knnClassify = (
  trainFeatures: tf.Tensor2D,
  trainLabels: Int32Array,
  testFeatures: tf.Tensor2D,
  testLabels: Int32Array,
  options: KnnOptions,
): Effect.Effect<KnnResult, EvaluationInputError> => {
  const n = trainFeatures.shape[0];
  const m = testFeatures.shape[0];
  const problem = trainLabels.length !== n
    ? `kNN: ${trainLabels.length} train labels for ${n} features`
    : testLabels.length !== m
    ? `kNN: ${testLabels.length} test labels for ${m} features`
    : undefined;
  if (problem !== undefined) return Effect.fail(new EvaluationInputError({ message: problem }));
  return Effect.promise(() => knnVotes(trainFeatures, trainLabels, testFeatures, testLabels, options));
};

/** The chunked vote, on inputs already checked to fit. */
const knnVotes = async (
  trainFeatures: tf.Tensor2D,
  trainLabels: Int32Array,
  testFeatures: tf.Tensor2D,
  testLabels: Int32Array,
  options: KnnOptions,
): Promise<KnnResult> => {
  const n = trainFeatures.shape[0];
  const m = testFeatures.shape[0];
  const k = Math.min(options.k, n);
  const chunkSize = options.chunkSize ?? 256;
  const bank = tf.tidy(() => l2NormaliseRows(trainFeatures).transpose());
  const labelsOnDevice = tf.tensor1d(trainLabels, "int32");
  let correct1 = 0;
  let correct5 = 0;
  const predictions = new Int32Array(m);
  try {
    for (let start = 0; start < m; start += chunkSize) {
      const rows = Math.min(chunkSize, m - start);
      const votes = tf.tidy(() => {
        const query = l2NormaliseRows(testFeatures.slice([start, 0], [rows, -1]));
        const similarity = query.matMul(bank); // [rows, N]
        const { values, indices } = tf.topk(similarity, k);
        const weights = values.div(options.temperature).exp(); // [rows, k]
        const neighbourLabels = tf.gather(labelsOnDevice, indices.flatten()).reshape([rows, k]);
        const oneHot = tf.oneHot(neighbourLabels, options.numClasses); // [rows, k, C]
        return oneHot.mul(weights.expandDims(2)).sum(1) as tf.Tensor2D; // [rows, C]
      });
      const ranked = tf.topk(votes, Math.min(5, options.numClasses));
      const order = (await ranked.indices.data()) as Int32Array;
      tf.dispose([votes, ranked.values, ranked.indices]);
      const width = Math.min(5, options.numClasses);
      for (let r = 0; r < rows; r++) {
        const truth = testLabels[start + r]!;
        const top = order.subarray(r * width, (r + 1) * width);
        predictions[start + r] = top[0]!;
        if (top[0] === truth) correct1++;
        if (top.includes(truth)) correct5++;
      }
    }
  } finally {
    tf.dispose([bank, labelsOnDevice]);
  }
  return { top1: correct1 / m, top5: correct5 / m, predictions };
};

/**
 * How pretraining scores features (the periodic kNN, the online probe): the run's
 * crop size, mean and std, and the test-time resize `eval` uses by default
 * (Resize(256/224 x size) before the centre crop), so the numbers agree with `eval`.
 */
export const runEvalTransform = (config: RunConfig) => {
  const size = config.multicrop.sizeCrops[0]!;
  return {
    size,
    resize: evalResizeFor(size),
    mean: config.multicrop.mean,
    std: config.multicrop.std,
    workers: config.data.workers,
    onError: config.data.onError,
  };
};

/**
 * kNN top-1 of the model's backbone features on a labelled train/test pair,
 * with the run config's eval transform and kNN settings (used by pretrain's
 * periodic check and by the demo).
 */
export const knnTop1 = (
  model: SwavModel,
  train: DataSource,
  test: DataSource,
  config: RunConfig,
): Effect.Effect<number, DecodeError | LoaderError | EvaluationInputError> =>
  Effect.gen(function* () {
    const common = runEvalTransform(config);
    const a = yield* extractFeatures(model, train, common);
    const b = yield* extractFeatures(model, test, common);
    const result = yield* knnClassify(a.features, a.labels, b.features, b.labels, {
      k: config.train.knnK,
      temperature: config.train.knnTemperature,
      numClasses: train.classes?.length ?? 1 + Math.max(...a.labels),
    }).pipe(Effect.ensuring(Effect.sync(() => tf.dispose([a.features, b.features]))));
    return result.top1;
  });
