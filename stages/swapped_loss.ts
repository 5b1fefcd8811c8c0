/**
 * The swapped prediction loss: the code of each assignment crop (computed by
 * Sinkhorn from that crop's detached scores, queue rows prepended) is predicted
 * from the scores of every other crop, small crops included.
 *
 * Scores are crop-major: rows [bs*v, bs*(v+1)) belong to crop v. For each
 * assignment crop c (index i in `cropsForAssign`) with codes q_i:
 *
 *     sub_i = Σ_{v≠c} −mean_b Σ_k q_i[b,k] · log_softmax(scores_v / T)[b,k]
 *     loss  = Σ_i sub_i / (V − 1) / n
 *
 * All the cross terms come out of one matrix product: codes [n, bs·K] times
 * log-probabilities [V, bs·K]ᵀ gives every (i, v) pair at once; a mask drops
 * v = c_i. Gradients flow into the scores through the log-softmax only.
 */
import * as tf from "@tensorflow/tfjs";
import { Effect, Schema, type Scope } from "effect";
import { defineStage } from "./stage.ts";
import { withoutGradient } from "../backend/no_gradient.ts";
import { sinkhornKnopp } from "./sinkhorn.ts";

export interface CropLayout {
  /** Samples per crop (per process in the reference). */
  readonly batchSize: number;
  /** Crops per resolution group, e.g. [2, 6]: the total is their sum. */
  readonly nmbCrops: readonly number[];
  /** Indices of the crops whose codes are predicted (the reference's [0, 1]). */
  readonly cropsForAssign: readonly number[];
}

export interface SwappedLossOptions extends CropLayout {
  /** Softmax temperature (reference 0.1). */
  readonly temperature: number;
}

export interface AssignmentOptions extends CropLayout {
  readonly epsilon: number;
  readonly iterations: number;
  /** queueScores[i]: the queue's scores [queueLength, K] for cropsForAssign[i], prepended before Sinkhorn. */
  readonly queueScores?: readonly tf.Tensor2D[];
}

export type SwappedPredictionOptions = SwappedLossOptions & AssignmentOptions;

/** A crop layout that does not fit the scores it is applied to. */
export class CropLayoutError extends Schema.TaggedError<CropLayoutError>()("CropLayoutError", {
  message: Schema.String,
}) {}

const totalCrops = (nmbCrops: readonly number[]): number => nmbCrops.reduce((a, b) => a + b, 0);

/** Checks `layout` against scores of shape [rows, K]; returns a message naming the problem, or undefined. */
export const cropLayoutProblem = (layout: CropLayout, rows: number): string | undefined => {
  const total = totalCrops(layout.nmbCrops);
  if (!Number.isInteger(layout.batchSize) || layout.batchSize < 1) {
    return `batchSize must be a positive integer, got ${layout.batchSize}`;
  }
  if (layout.nmbCrops.some((n) => !Number.isInteger(n) || n < 0) || total < 2) {
    return `nmbCrops must be non-negative integers summing to at least 2, got [${layout.nmbCrops}]`;
  }
  if (layout.cropsForAssign.length === 0) return "cropsForAssign must not be empty";
  const bad = layout.cropsForAssign.find((c) => !Number.isInteger(c) || c < 0 || c >= total);
  if (bad !== undefined) return `cropsForAssign has crop ${bad}, outside 0..${total - 1}`;
  if (rows !== layout.batchSize * total) {
    return `scores have ${rows} rows, expected batchSize * total crops = ${layout.batchSize} * ${total}`;
  }
  return undefined;
};

const checkLayout = (layout: CropLayout, scores: tf.Tensor2D): void => {
  if (scores.rank !== 2) {
    throw new CropLayoutError({ message: `scores must be [rows, K], got [${scores.shape}]` });
  }
  const problem = cropLayoutProblem(layout, scores.shape[0]);
  if (problem !== undefined) throw new CropLayoutError({ message: problem });
};

/**
 * Codes [batchSize, K] for every assignment crop, from detached scores: the
 * crop's rows, with queueScores[i] prepended, through Sinkhorn; the queue's rows
 * are dropped after. Carries no gradient and records nothing on a tape.
 */
export const assignmentCodes = (scores: tf.Tensor2D, options: AssignmentOptions): tf.Tensor2D[] => {
  checkLayout(options, scores);
  const { batchSize: bs, cropsForAssign, queueScores } = options;
  if (queueScores !== undefined && queueScores.length !== cropsForAssign.length) {
    throw new CropLayoutError({
      message:
        `queueScores has ${queueScores.length} entries, expected one per assignment crop (${cropsForAssign.length})`,
    });
  }
  const k = scores.shape[1];
  return tf.tidy(() => {
    // One op off the tape for all crops: stacked [n*bs, K], split after.
    const stacked = withoutGradient((s, ...queue) =>
      tf.concat(
        cropsForAssign.map((crop, i) => {
          const own = s.slice([bs * crop, 0], [bs, k]) as tf.Tensor2D;
          const q = queue[i];
          if (q === undefined) return sinkhornKnopp(own, options);
          const withQueue = tf.concat([q as tf.Tensor2D, own], 0);
          return sinkhornKnopp(withQueue, options).slice([withQueue.shape[0] - bs, 0], [bs, k]);
        }),
        0,
      ), [scores, ...(queueScores ?? [])]);
    // (tf.split's gradient fails for a single piece, so one crop is returned whole)
    return cropsForAssign.length === 1
      ? [stacked]
      : tf.split(stacked, cropsForAssign.length, 0) as tf.Tensor2D[];
  });
};

/**
 * The swapped prediction loss from scores [bs * totalCrops, K] (crop-major) and
 * codes (one [bs, K] per assignment crop). Differentiable in `scores`; the codes
 * are treated as constants.
 */
export const swappedLossFromCodes = (
  scores: tf.Tensor2D,
  codes: readonly tf.Tensor2D[],
  options: SwappedLossOptions,
): tf.Scalar => {
  checkLayout(options, scores);
  const { batchSize: bs, cropsForAssign, temperature } = options;
  if (codes.length !== cropsForAssign.length) {
    throw new CropLayoutError({
      message: `got ${codes.length} codes, expected one per assignment crop (${cropsForAssign.length})`,
    });
  }
  const k = scores.shape[1];
  const bad = codes.find((q) => q.shape[0] !== bs || q.shape[1] !== k);
  if (bad !== undefined) {
    throw new CropLayoutError({ message: `codes must be [${bs}, ${k}], got [${bad.shape}]` });
  }
  const total = totalCrops(options.nmbCrops);
  const n = cropsForAssign.length;
  return tf.tidy(() => {
    const logP = tf.logSoftmax(tf.div(scores, temperature)).reshape([total, bs * k]);
    const q = codes.length === 1
      ? codes[0]!.reshape([1, bs * k])
      : tf.concat(codes.map((c) => c.reshape([1, bs * k])), 0);
    // cross[i, v] = Σ_b Σ_k q_i · logP_v
    const cross = tf.matMul(q, logP, false, true);
    const mask = new Float32Array(n * total);
    cropsForAssign.forEach((crop, i) => {
      for (let v = 0; v < total; v++) if (v !== crop) mask[i * total + v] = 1;
    });
    const weighted = tf.mul(cross, tf.tensor2d(mask, [n, total]));
    return tf.mul(tf.sum(weighted), -1 / (bs * (total - 1) * n)) as tf.Scalar;
  });
};

/**
 * The composed one-call form: codes from the detached scores (queue rows
 * prepended for each assignment crop), then the swapped loss. The gradient with
 * respect to `scores` is the reference's: none flows through the codes.
 */
export const swappedPredictionLoss = (scores: tf.Tensor2D, options: SwappedPredictionOptions): tf.Scalar =>
  tf.tidy(() => swappedLossFromCodes(scores, assignmentCodes(scores, options), options));

/** The swappedLoss stage's config, with the reference's defaults. */
export const SwappedLossConfig = Schema.Struct({
  nmbCrops: Schema.Array(Schema.Int.check(Schema.isGreaterThanOrEqualTo(0))).pipe(
    Schema.withDecodingDefaultKey(Effect.succeed([2])),
  ),
  cropsForAssign: Schema.Array(Schema.Int.check(Schema.isGreaterThanOrEqualTo(0))).pipe(
    Schema.withDecodingDefaultKey(Effect.succeed([0, 1])),
  ),
  temperature: Schema.Finite.check(Schema.isGreaterThan(0)).pipe(
    Schema.withDecodingDefaultKey(Effect.succeed(0.1)),
  ),
}).check(
  Schema.makeFilter((c) => {
    const total = totalCrops(c.nmbCrops);
    if (total < 2) {
      return { path: ["nmbCrops"], issue: `nmbCrops must sum to at least 2, got [${c.nmbCrops}]` };
    }
    if (c.cropsForAssign.length === 0) {
      return { path: ["cropsForAssign"], issue: "cropsForAssign must not be empty" };
    }
    const bad = c.cropsForAssign.find((crop) => crop >= total);
    return bad === undefined
      ? undefined
      : { path: ["cropsForAssign"], issue: `cropsForAssign has crop ${bad}, outside 0..${total - 1}` };
  }),
);
export type SwappedLossConfig = typeof SwappedLossConfig.Type;

export interface SwappedLossInput {
  /** Crop-major scores [bs * totalCrops, K]; the batch size is rows / totalCrops. */
  readonly scores: tf.Tensor2D;
  /** One [bs, K] code per assignment crop (from `assignmentCodes` or the sinkhorn stage). */
  readonly codes: readonly tf.Tensor2D[];
}

/**
 * swappedLoss stage: (scores, codes) to the scalar loss, owned by the caller's
 * scope. Fails with CropLayoutError when the layout does not fit the scores.
 */
export const swappedLossStage = defineStage<
  SwappedLossInput,
  tf.Scalar,
  SwappedLossConfig,
  CropLayoutError,
  Scope.Scope
>({
  name: "swappedLoss",
  config: SwappedLossConfig,
  run: (config) => ({ scores, codes }) =>
    Effect.suspend(() => {
      const total = totalCrops(config.nmbCrops);
      const batchSize = total > 0 ? scores.shape[0] / total : 0;
      const options = { ...config, batchSize };
      const problem = scores.rank === 2 ? cropLayoutProblem(options, scores.shape[0]) : "scores must be 2-D";
      if (problem !== undefined) return Effect.fail(new CropLayoutError({ message: problem }));
      return Effect.acquireRelease(
        Effect.try({
          try: () => swappedLossFromCodes(scores, codes, options),
          catch: (e) => e instanceof CropLayoutError ? e : new CropLayoutError({ message: String(e) }),
        }),
        (loss) => Effect.sync(() => loss.dispose()),
      );
    }),
});
