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
 * Codes carry no gradient: the computation runs as the forward pass of a
 * `tf.customGrad` op whose gradient is zero, so none of its ops is recorded on
 * an active gradient tape, and calling it inside `tf.variableGrads` is safe.
 */
import * as tf from "@tensorflow/tfjs";
import { Effect, Schema, type Scope } from "effect";
import { scoped } from "../backend/resources.ts";
import { defineStage } from "./stage.ts";

export interface SinkhornOptions {
  /** Entropic regularisation: smaller is sharper. The reference's default is 0.05. */
  readonly epsilon: number;
  /** Number of (row, column) normalisation pairs. The reference's default is 3. */
  readonly iterations: number;
}

/**
 * Runs `compute` on `inputs` with no gradient flowing back to them: inside a
 * gradient tape the result is a single op whose gradient is zero for every
 * input, and the ops inside `compute` are not recorded on the tape.
 */
export const withoutGradient = <T extends tf.Tensor>(
  compute: (...inputs: tf.Tensor[]) => T,
  inputs: readonly tf.Tensor[],
): T => {
  const op = tf.customGrad((...args: (tf.Tensor | tf.GradSaveFunc)[]) => {
    const tensors = args.slice(0, inputs.length) as tf.Tensor[];
    const out = compute(...tensors);
    // The forward runs in a tidy of its own: return a tensor that is not an input.
    const value = tensors.includes(out) ? out.clone() : out;
    return { value, gradFunc: () => tensors.map((t) => tf.zerosLike(t)) };
  });
  return op(...inputs) as T;
};

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
 * Codes [B, K] for scores [B, K] (queue rows, if any, first): each row sums to
 * 1 (for iterations ≥ 1), equal to the reference where the reference is finite,
 * finite for any positive epsilon. The result carries no gradient.
 */
export const sinkhornKnopp = (scores: tf.Tensor2D, options: SinkhornOptions): tf.Tensor2D => {
  if (scores.rank !== 2) throw new RangeError(`sinkhornKnopp: scores must be [B, K], got [${scores.shape}]`);
  if (!(options.epsilon > 0)) {
    throw new RangeError(`sinkhornKnopp: epsilon must be > 0, got ${options.epsilon}`);
  }
  if (!Number.isInteger(options.iterations) || options.iterations < 0) {
    throw new RangeError(`sinkhornKnopp: iterations must be an integer >= 0, got ${options.iterations}`);
  }
  return withoutGradient((s) => logDomainCodes(s as tf.Tensor2D, options), [scores]);
};

/** The sinkhorn stage's config, with the reference's defaults. */
export const SinkhornConfig = Schema.Struct({
  epsilon: Schema.Finite.check(Schema.isGreaterThan(0)).pipe(
    Schema.withDecodingDefaultKey(Effect.succeed(0.05)),
  ),
  iterations: Schema.Int.check(Schema.isGreaterThanOrEqualTo(0)).pipe(
    Schema.withDecodingDefaultKey(Effect.succeed(3)),
  ),
});
export type SinkhornConfig = typeof SinkhornConfig.Type;

/**
 * sinkhorn stage: detached scores [B, K] (queue rows first) to codes [B, K].
 * The codes are owned by the caller's scope.
 */
export const sinkhornStage = defineStage<tf.Tensor2D, tf.Tensor2D, SinkhornConfig, never, Scope.Scope>({
  name: "sinkhorn",
  config: SinkhornConfig,
  run: (config) => (scores) => scoped(() => sinkhornKnopp(scores, config)),
});
