/**
 * Spherical k-means as DeepCluster-v2's `cluster_memory` runs it on one memory
 * bank: the centroids start at K given rows; then `iterations` times an
 * assignment (the largest dot product) and an update (each centroid the mean
 * of its members, an empty cluster keeping its centroid, then every centroid
 * L2-normalised); then a final assignment. The dot products run on the tensor
 * backend (one [n, D]·[D, K] product per pass); the sums on the host in
 * float64.
 *
 * Data parallel, each rank runs it on its own rows with the same starting
 * centroids (`initial`) and `reduce` summing the clusters' sums and counts over
 * the ranks before each update, so every rank computes the global centroids.
 */
import * as tf from "@tensorflow/tfjs";
import type { Tensor2D } from "../backend/tensor_types.ts";
import { Effect, Schema } from "effect";

/** What spherical k-means clusters: the rows, where it starts and how many update steps it takes. */
export interface KmeansInput {
  /** The bank's rows [n, dim], row-major. */
  readonly rows: Float32Array;
  /** Number of rows. */
  readonly n: number;
  /** Row length. */
  readonly dim: number;
  /** The starting centroids: K row indices into `rows`. */
  readonly start: Int32Array;
  /** Update steps (the reference's 10); a final assignment follows. */
  readonly iterations: number;
  /** The starting centroids' values [K, dim] instead of `start`'s rows (data parallel: the global rows). */
  readonly initial?: Float32Array | undefined;
  /** Sums the clusters' sums [K·dim] and counts [K] over the ranks, in place (data parallel). */
  readonly reduce?: ((sums: Float64Array, counts: Float64Array) => void) | undefined;
}

/** The clustering: unit-norm centroids and each row's cluster. */
export interface KmeansOutput {
  /** Unit-norm centroids [K, dim], row-major. */
  readonly centroids: Float32Array;
  /** Each row's cluster. */
  readonly assignments: Int32Array;
}

/** Fewer rows than clusters: k-means cannot start. */
export class TooFewRows extends Schema.TaggedError<TooFewRows>()("TooFewRows", {
  message: Schema.String,
}) {}

/** Each row's largest dot product with the centroids (the first on ties, as torch's max). */
const assign = (rows: Tensor2D, centroids: Float32Array, k: number, dim: number) =>
  Effect.promise(async () => {
    // A rank whose shard holds no rows has nothing to assign.
    if (rows.shape[0] === 0) return new Int32Array(0);
    const winners = tf.tidy(() =>
      tf.argMax(tf.matMul(rows, tf.tensor2d(centroids, [k, dim]), false, true), 1)
    );
    try {
      return new Int32Array(await winners.data());
    } finally {
      winners.dispose();
    }
  });

/** Each cluster's sum of member rows [K·dim] and member count [K], in float64. */
export const clusterSums = (
  rows: Float32Array,
  assignments: Int32Array,
  k: number,
  dim: number,
): { sums: Float64Array; counts: Float64Array } => {
  const sums = new Float64Array(k * dim);
  const counts = new Float64Array(k);
  for (let r = 0; r < assignments.length; r++) {
    const c = assignments[r]!;
    counts[c]! += 1;
    for (let j = 0; j < dim; j++) sums[c * dim + j]! += rows[r * dim + j]!;
  }
  return { sums, counts };
};

/** The centroids from the clusters' sums and counts: each non-empty cluster's mean, then normalised. */
export const centroidsFrom = (
  sums: Float64Array,
  counts: Float64Array,
  centroids: Float32Array,
  dim: number,
): Float32Array => {
  const k = centroids.length / dim;
  const next = new Float32Array(k * dim);
  for (let c = 0; c < k; c++) {
    let ss = 0;
    const mean = new Float64Array(dim);
    for (let j = 0; j < dim; j++) {
      mean[j] = counts[c]! > 0 ? sums[c * dim + j]! / counts[c]! : centroids[c * dim + j]!;
      ss += mean[j]! * mean[j]!;
    }
    const inv = 1 / Math.max(Math.sqrt(ss), 1e-12);
    for (let j = 0; j < dim; j++) next[c * dim + j] = mean[j]! * inv;
  }
  return next;
};

/** The update: each non-empty cluster's mean, then every centroid normalised (F.normalize's 1e-12 floor). */
export const updateCentroids = (
  rows: Float32Array,
  assignments: Int32Array,
  centroids: Float32Array,
  dim: number,
  reduce?: (sums: Float64Array, counts: Float64Array) => void,
): Float32Array => {
  const { sums, counts } = clusterSums(rows, assignments, centroids.length / dim, dim);
  reduce?.(sums, counts);
  return centroidsFrom(sums, counts, centroids, dim);
};

/**
 * Spherical k-means of `input.rows` from `input.start`: see the module comment.
 *
 * @example Two directions, two clusters
 * ```ts
 * import { Effect } from "effect";
 * import assert from "node:assert/strict";
 * import { initBackend, sphericalKmeans } from "@swav/swav-ts";
 *
 * await initBackend("cpu");
 * const rows = new Float32Array([1, 0, 0.9, 0.1, 0.95, -0.1, 0, 1, 0.1, 0.9, -0.1, 0.95]); // 6 rows of 2
 * const { assignments } = await Effect.runPromise(
 *   sphericalKmeans({ rows, n: 6, dim: 2, start: new Int32Array([0, 3]), iterations: 5 }),
 * );
 * assert.deepEqual([...assignments], [0, 0, 0, 1, 1, 1]);
 * ```
 */
export const sphericalKmeans = (input: KmeansInput): Effect.Effect<KmeansOutput, TooFewRows> =>
  Effect.gen(function* () {
    const { rows, n, dim, start, iterations, initial, reduce } = input;
    const k = initial === undefined ? start.length : initial.length / dim;
    // Data parallel, a rank's own rows may be fewer than K: the caller checks the global count.
    if (initial === undefined && n < k) {
      return yield* new TooFewRows({
        message: `the memory bank holds ${n} samples, fewer than the ${k} clusters asked for`,
      });
    }
    let centroids: Float32Array = new Float32Array(k * dim);
    if (initial !== undefined) centroids.set(initial);
    else start.forEach((row, c) => centroids.set(rows.subarray(row * dim, (row + 1) * dim), c * dim));
    const bank = yield* Effect.acquireRelease(
      Effect.sync(() => tf.tensor2d(rows.subarray(0, n * dim), [n, dim])),
      (t) => Effect.sync(() => t.dispose()),
    );
    let assignments = yield* assign(bank, centroids, k, dim);
    for (let it = 0; it < iterations; it++) {
      centroids = updateCentroids(rows, assignments, centroids, dim, reduce);
      assignments = yield* assign(bank, centroids, k, dim);
    }
    return { centroids, assignments };
  }).pipe(Effect.scoped);
