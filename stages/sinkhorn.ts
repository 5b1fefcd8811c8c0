/**
 * Sinkhorn-Knopp: turns prototype scores into soft codes under the
 * equal-partition constraint (every prototype gets 1/K of the batch's mass).
 *
 * The reference (main_swav.py's `distributed_sinkhorn`) exponentiates
 * `scores / eps`, which overflows float32 below eps ≈ 0.0113. Here the same
 * iteration runs on log Q: each division by a row or column sum becomes the
 * subtraction of a logsumexp, which stays finite for any eps. The reference's
 * first global normalisation `Q /= sum(Q)` is kept (it is what the 0-iteration
 * case returns); for iterations ≥ 1 the first row normalisation would absorb it.
 *
 * On the wasm and cpu backends, where `dataSync` is a cheap copy, the codes
 * are computed on the host instead (`plainDomainCodes`): the same iteration in
 * float64 in the plain domain, which float64's range allows once the scores are
 * shifted by their maximum, as long as (max − min) / eps ≤ 600; beyond that (for
 * example eps 0.001 with scores spanning ±1) the log-domain tensor path runs.
 * Measured on wasm for one [64, 3000] score matrix (eps 0.05, 3 iterations), the
 * tensor path (~25 small kernels over 192k elements each, several of them
 * logsumexps) costs ~6.5 ms, the host path ~2.4 ms once V8 has optimised its
 * loops (~5.5 ms over the first ~40 calls of a process).
 *
 * Under a communicator of several ranks (`activeCommunicator()`), each rank's
 * scores are its rows of one matrix, as in the reference's data-parallel runs:
 * B is the local rows times the world size, and the total and the prototype
 * sums are all-reduced (both paths: in float64 on the host path, the maxima and
 * then the sums of the logsumexps on the tensor path). Every rank must call with
 * the same number of rows and prototypes. A world of one does no extra work.
 *
 * Codes carry no gradient: the computation runs as the forward pass of a
 * `tf.customGrad` op whose gradient is zero, so none of its ops is recorded on
 * an active gradient tape, and calling it inside `tf.variableGrads` is safe.
 */
import * as tf from "@tensorflow/tfjs";
import { Effect, Schema, type Scope } from "effect";
import { withoutGradient } from "../backend/no_gradient.ts";
import { scoped } from "../backend/resources.ts";
import { NonNegativeInt, Positive, withDefault } from "../models/schema.ts";
import { hostBackendActive, hostCodes, type SinkhornOptions } from "../backend/sinkhorn_host.ts";
import { type CropLayout, CropLayoutError, inputProblem } from "./crop_layout.ts";
import { defineTensorStage, type TensorStage } from "./stage.ts";
import type { Tensor2D } from "../backend/tensor_types.ts";
import { kernelInvariant } from "../backend/invariant.ts";
import { activeCommunicator, type Communicator } from "../backend/communicator.ts";

export type { SinkhornOptions } from "../backend/sinkhorn_host.ts";

/**
 * The log-domain iteration on scores [B, K], returning the codes. Laid out
 * [B, K], the reference's rows (prototypes, summed over samples) are our
 * columns (axis 0), and its columns (samples) our rows (axis 1).
 */
const logDomainCodes = (scores: tf.Tensor2D, { epsilon, iterations }: SinkhornOptions): tf.Tensor2D =>
  tf.tidy(() => {
    const [b, k] = scores.shape;
    const logB = Math.log(b);
    const logK = Math.log(k);
    let logQ: tf.Tensor2D = tf.div(scores.toFloat(), epsilon);
    logQ = tf.sub(logQ, tf.logSumExp(logQ));
    if (iterations === 0) return tf.exp(tf.add(logQ, logB));
    for (let i = 0; i < iterations; i++) {
      logQ = tf.sub(logQ, tf.add(tf.logSumExp(logQ, 0, true), logK));
      if (i < iterations - 1) logQ = tf.sub(logQ, tf.add(tf.logSumExp(logQ, 1, true), logB));
    }
    // The last sample normalisation followed by Q *= B is a softmax over each
    // row: computing it as one keeps the rows summing to 1 to float32 rounding,
    // where exp of entries of magnitude |s|/eps would be off by ~1e-5 at eps 0.001.
    return tf.softmax(logQ, 1);
  });

/**
 * logsumexp over axis 0 of x [b, k] when each rank holds b rows of one matrix:
 * the column maxima are all-reduced (max), then the sums of exp(x − max)
 * (sum), through host copies of the [k] vectors (dataSync: the collectives are
 * synchronous, and this runs inside a synchronous kernel on every backend, webgpu
 * included). Returns [1, k]; like tf.logSumExp, a column that is −∞ on every
 * rank gives NaN.
 */
const allReducedColumnLogSumExp = (x: tf.Tensor2D, world: Communicator): tf.Tensor2D => {
  const k = x.shape[1];
  const max = Float32Array.from(tf.max(x, 0).dataSync());
  world.allReduce(max, "max");
  const maxT = tf.tensor2d(max, [1, k]);
  const sums = Float32Array.from(tf.sum(tf.exp(tf.sub(x, maxT)), 0).dataSync());
  world.allReduce(sums, "sum");
  return tf.add(maxT, tf.log(tf.tensor2d(sums, [1, k])));
};

/**
 * The log-domain iteration when each of `world.size` ranks holds b rows of one
 * matrix: the reference's `distributed_sinkhorn` (B = b·size, the total and the
 * prototype sums over every rank) in the log domain. The global normalisation
 * is the all-reduced logsumexp of the row logsumexps ([b, 1] → one column).
 */
const distributedLogDomainCodes = (
  scores: tf.Tensor2D,
  { epsilon, iterations }: SinkhornOptions,
  world: Communicator,
): tf.Tensor2D =>
  tf.tidy(() => {
    const [b, k] = scores.shape;
    const logB = Math.log(b * world.size);
    const logK = Math.log(k);
    let logQ: tf.Tensor2D = tf.div(scores.toFloat(), epsilon);
    const rowLse = tf.logSumExp(logQ, 1, true).reshape([b, 1]) as tf.Tensor2D;
    logQ = tf.sub(logQ, allReducedColumnLogSumExp(rowLse, world));
    if (iterations === 0) return tf.exp(tf.add(logQ, logB));
    for (let i = 0; i < iterations; i++) {
      logQ = tf.sub(logQ, tf.add(allReducedColumnLogSumExp(logQ, world), logK));
      if (i < iterations - 1) logQ = tf.sub(logQ, tf.add(tf.logSumExp(logQ, 1, true), logB));
    }
    return tf.softmax(logQ, 1);
  });

/**
 * Which implementation runs: `auto` takes the host path on the wasm and cpu
 * backends (falling back to the tensor path where the plain domain could
 * underflow), the tensor path elsewhere; `tensor` always takes the log-domain
 * tensor path (for tests and comparisons).
 */
export type ComputePath = "auto" | "tensor";

/**
 * Codes [B, K] for scores [B, K] (queue rows, if any, first): each row sums to
 * 1 (for iterations ≥ 1), equal to the reference where the reference is finite,
 * finite for any positive epsilon. The result carries no gradient.
 *
 * @example Codes for 8 samples over 4 prototypes
 * ```ts
 * import * as tf from "@tensorflow/tfjs";
 * import assert from "node:assert/strict";
 * import { initBackend, sinkhornKnopp } from "@swav/swav-ts";
 *
 * await initBackend("cpu");
 * const scores = tf.randomNormal<tf.Rank.R2>([8, 4], 0, 1, "float32", 1);
 * const codes = sinkhornKnopp(scores, { epsilon: 0.05, iterations: 3 });
 * // Each sample's code is a distribution over the prototypes...
 * const rows = await codes.sum(1).data();
 * assert.ok(rows.every((sum) => Math.abs(sum - 1) < 1e-5));
 * // ...and the prototypes share the batch more equally than a plain softmax shares it.
 * const spread = async (q: tf.Tensor2D) => {
 *   const columns = await q.sum(0).data();
 *   return Math.max(...columns) - Math.min(...columns);
 * };
 * const softmax = tf.softmax(scores.div(0.05)) as tf.Tensor2D;
 * assert.ok((await spread(codes)) < (await spread(softmax)));
 * tf.dispose([scores, codes, softmax]);
 * ```
 */
export const sinkhornKnopp = (
  scores: tf.Tensor2D,
  options: SinkhornOptions,
  path: ComputePath = "auto",
): tf.Tensor2D => {
  // A synchronous tensor function, also run inside the training step's tape: no Effect channel here.
  // The sinkhorn stage validates its config (the same bounds) with its Schema before any of this runs.
  kernelInvariant(scores.rank === 2, () => `sinkhornKnopp: scores must be [B, K], got [${scores.shape}]`);
  kernelInvariant(options.epsilon > 0, () => `sinkhornKnopp: epsilon must be > 0, got ${options.epsilon}`);
  kernelInvariant(
    Number.isInteger(options.iterations) && options.iterations >= 0,
    () => `sinkhornKnopp: iterations must be an integer >= 0, got ${options.iterations}`,
  );
  return withoutGradient((s) => {
    if (path === "auto" && hostBackendActive()) {
      const codes = hostCodes(s as tf.Tensor2D, options);
      if (codes !== undefined) return codes;
    }
    const world = activeCommunicator();
    return world.size > 1
      ? distributedLogDomainCodes(s as tf.Tensor2D, options, world)
      : logDomainCodes(s as tf.Tensor2D, options);
  }, [scores]);
};

/** The sinkhorn stage's own settings, with the reference's defaults (the run config's `swav` section holds them). */
export const sinkhornFields = {
  /** Sinkhorn-Knopp entropic regularisation. */
  epsilon: withDefault(Positive, 0.05),
  /** Sinkhorn-Knopp iterations: (column, row) normalisation pairs. */
  sinkhornIterations: withDefault(NonNegativeInt, 3),
};
/** A validated sinkhorn config. */
export interface SinkhornConfig {
  /** Sinkhorn-Knopp entropic regularisation (> 0; reference 0.05). */
  readonly epsilon: number;
  /** Sinkhorn-Knopp iterations: (column, row) normalisation pairs (>= 0; reference 3). */
  readonly sinkhornIterations: number;
}

/** The sinkhorn stage's config schema: validates `epsilon` and `sinkhornIterations` and fills the reference's defaults. */
export const SinkhornConfig: Schema.Codec<SinkhornConfig, Partial<SinkhornConfig>> = Schema.Struct(
  sinkhornFields,
);

/** What the sinkhorn stage reads: the scores, and optionally the crop layout and the queue's scores. */
export interface SinkhornInput {
  /**
   * Scores, read as constants. With `layout`, crop-major [bs·V, K] and one code
   * per assignment crop; without, one matrix [B, K] and one code.
   */
  readonly scores: Tensor2D;
  /** How the rows are laid out by crop; without it, the whole matrix gets one code. */
  readonly layout?: CropLayout | undefined;
  /** queueScores[i]: the queue's scores [queueLength, K] for cropsForAssign[i], prepended before Sinkhorn. */
  readonly queueScores?: readonly Tensor2D[] | undefined;
}

/** Codes [bs, K] per assignment crop (queue rows prepended, dropped after); no layout checks. */
const assignmentCodesOf = (config: SinkhornConfig) => {
  const options = { epsilon: config.epsilon, iterations: config.sinkhornIterations };
  return ({ scores, layout, queueScores }: SinkhornInput): tf.Tensor2D[] => {
    if (layout === undefined) return [sinkhornKnopp(scores, options)];
    const { batchSize: bs, cropsForAssign } = layout;
    const k = scores.shape[1];
    return cropsForAssign.map((crop, i) => {
      const own = scores.slice([bs * crop, 0], [bs, k]) as tf.Tensor2D;
      const q = queueScores?.[i];
      if (q === undefined) return sinkhornKnopp(own, options);
      const withQueue = tf.concat([q, own], 0);
      return sinkhornKnopp(withQueue, options).slice([withQueue.shape[0] - bs, 0], [bs, k]);
    });
  };
};

/**
 * sinkhorn stage: detached scores (queue rows prepended per assignment crop) to
 * codes whose rows sum to 1, one per assignment crop. `apply` is meant for the
 * detached side of a training step (stages/tape.ts runs it off the tape); `run`
 * checks the layout and its codes are owned by the caller's scope.
 *
 * @example Configured from raw JSON, run on two crops of 4 samples each
 * ```ts
 * import * as tf from "@tensorflow/tfjs";
 * import { Effect } from "effect";
 * import assert from "node:assert/strict";
 * import { configure, initBackend, sinkhornStage } from "@swav/swav-ts";
 *
 * await initBackend("cpu");
 * const shapes = await Effect.runPromise(Effect.scoped(Effect.gen(function* () {
 *   const assign = yield* configure(sinkhornStage, { epsilon: 0.05, sinkhornIterations: 3 });
 *   const scores = tf.randomNormal<tf.Rank.R2>([2 * 4, 16]); // crop-major: crop 0's rows, then crop 1's
 *   const codes = yield* assign({ scores, layout: { batchSize: 4, nmbCrops: [2], cropsForAssign: [0, 1] } });
 *   scores.dispose();
 *   return codes.map((q) => q.shape); // the codes are disposed with the scope
 * })));
 * assert.deepEqual(shapes, [[4, 16], [4, 16]]);
 * ```
 */
export const sinkhornStage: TensorStage<
  SinkhornInput,
  readonly Tensor2D[],
  SinkhornConfig,
  CropLayoutError,
  Scope.Scope
> = defineTensorStage<
  SinkhornInput,
  readonly tf.Tensor2D[],
  SinkhornConfig,
  CropLayoutError,
  Scope.Scope
>({
  name: "sinkhorn",
  config: SinkhornConfig,
  apply: assignmentCodesOf,
  run: (config) => (input) => {
    const problem = input.layout === undefined
      ? (input.scores.rank === 2 ? undefined : `scores must be [B, K], got [${input.scores.shape}]`)
      : inputProblem(input.layout, input.scores, input);
    return problem === undefined
      ? scoped(() => tf.tidy(() => assignmentCodesOf(config)(input)))
      : Effect.fail(new CropLayoutError({ message: problem }));
  },
});
