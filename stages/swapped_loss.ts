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
import { NonNegativeInt, Positive, withDefault } from "../models/schema.ts";
import { type CropLayout, CropLayoutError, inputProblem, totalCrops } from "./crop_layout.ts";
import { sinkhornStage } from "./sinkhorn.ts";
import { defineTensorStage, type TensorStage } from "./stage.ts";
import type { Scalar, Tensor2D } from "../backend/tensor_types.ts";
import { detached } from "./tape.ts";

export { type CropLayout, CropLayoutError, cropLayoutProblem } from "./crop_layout.ts";

/** The swapped loss's settings for one call: the crop layout and the softmax temperature. */
export interface SwappedLossOptions extends CropLayout {
  /** Softmax temperature (reference 0.1). */
  readonly temperature: number;
}

/** How `assignmentCodes` computes codes: the crop layout, the Sinkhorn settings and the queue's scores if any. */
export interface AssignmentOptions extends CropLayout {
  /** Sinkhorn-Knopp entropic regularisation (reference 0.05). */
  readonly epsilon: number;
  /** Sinkhorn-Knopp iterations (reference 3). */
  readonly iterations: number;
  /** queueScores[i]: the queue's scores [queueLength, K] for cropsForAssign[i], prepended before Sinkhorn. */
  readonly queueScores?: readonly Tensor2D[];
}

/** The settings of the composed `swappedPredictionLoss`: those of the codes and those of the loss. */
export type SwappedPredictionOptions = SwappedLossOptions & AssignmentOptions;

/**
 * Throws CropLayoutError when the inputs do not fit the layout: these plain
 * functions are synchronous tensor maths (they may run inside a gradient tape),
 * so they cannot fail through Effect; the stages check first and fail typed.
 */
const checkLayout = (
  layout: CropLayout,
  scores: tf.Tensor2D,
  parts: Parameters<typeof inputProblem>[2],
): void => {
  const problem = inputProblem(layout, scores, parts);
  // synchronous tensor function (see above): no Effect error channel here
  if (problem !== undefined) throw new CropLayoutError({ message: problem });
};

/**
 * Codes [batchSize, K] for every assignment crop, from detached scores: the
 * crop's rows, with queueScores[i] prepended, through Sinkhorn; the queue's rows
 * are dropped after. Carries no gradient and records nothing on a tape.
 */
export const assignmentCodes = (scores: tf.Tensor2D, options: AssignmentOptions): tf.Tensor2D[] => {
  const { queueScores } = options;
  checkLayout(options, scores, { queueScores });
  const assign = sinkhornStage.apply({ epsilon: options.epsilon, sinkhornIterations: options.iterations });
  return detached(assign)({ scores, layout: options, queueScores });
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
  checkLayout(options, scores, { codes });
  return lossFromCodes(scores, codes, options);
};

/** The loss itself, for inputs already checked. */
const lossFromCodes = (
  scores: tf.Tensor2D,
  codes: readonly tf.Tensor2D[],
  options: SwappedLossOptions,
): tf.Scalar => {
  const { batchSize: bs, cropsForAssign, temperature } = options;
  const k = scores.shape[1];
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
 *
 * @example The loss and its gradient for two crops of 4 samples over 10 prototypes
 * ```ts
 * import * as tf from "@tensorflow/tfjs";
 * import assert from "node:assert/strict";
 * import { initBackend, swappedPredictionLoss } from "@swav/swav-ts";
 *
 * await initBackend("cpu");
 * const options = { batchSize: 4, nmbCrops: [2], cropsForAssign: [0, 1], temperature: 0.1, epsilon: 0.05, iterations: 3 };
 * const scores = tf.randomNormal<tf.Rank.R2>([2 * 4, 10], 0, 1, "float32", 2);
 * const { value, grad } = tf.valueAndGrad((s: tf.Tensor) => swappedPredictionLoss(s as tf.Tensor2D, options))(scores);
 * assert.ok((await value.data())[0]! > 0); // a cross-entropy
 * assert.deepEqual(grad.shape, [8, 10]); // what the encoder's backward pass receives
 * tf.dispose([scores, value, grad]);
 * ```
 */
export const swappedPredictionLoss = (scores: tf.Tensor2D, options: SwappedPredictionOptions): tf.Scalar =>
  tf.tidy(() => swappedLossFromCodes(scores, assignmentCodes(scores, options), options));

/** The swappedLoss stage's own settings, with the reference's defaults (the run config's `swav` section holds them). */
export const swappedLossFields = {
  /** Softmax temperature of the swapped prediction. */
  temperature: withDefault(Positive, 0.1),
  /** Crops whose codes are predicted (the two full-resolution crops). */
  cropsForAssign: withDefault(Schema.Array(NonNegativeInt), [0, 1]),
};

const swappedLossConfigFields = {
  /** Crops per resolution group, e.g. [2, 6]. */
  nmbCrops: withDefault(Schema.Array(NonNegativeInt), [2]),
  ...swappedLossFields,
};

/** A validated swappedLoss config. */
export interface SwappedLossConfig {
  /** Crops per resolution group, e.g. [2, 6] (their sum is at least 2). */
  readonly nmbCrops: readonly number[];
  /** Softmax temperature of the swapped prediction (> 0; reference 0.1). */
  readonly temperature: number;
  /** Crops whose codes are predicted, each below the total crop count (reference [0, 1]). */
  readonly cropsForAssign: readonly number[];
}

/** The swappedLoss stage's config schema: its settings and the crops per resolution (the run's `multicrop.nmbCrops`). */
export const SwappedLossConfig: Schema.Codec<SwappedLossConfig, Partial<SwappedLossConfig>> = Schema.Struct(
  swappedLossConfigFields,
).check(
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

/** What the swappedLoss stage reads: every crop's scores and the codes of the assignment crops. */
export interface SwappedLossInput {
  /** Crop-major scores [bs * totalCrops, K]; the batch size is rows / totalCrops. */
  readonly scores: Tensor2D;
  /** One [bs, K] code per assignment crop (from `assignmentCodes` or the sinkhorn stage). */
  readonly codes: readonly Tensor2D[];
}

/** The layout of `config` for scores with `rows` rows. */
const layoutOf = (config: SwappedLossConfig, rows: number): SwappedLossOptions => {
  const total = totalCrops(config.nmbCrops);
  return { ...config, batchSize: total > 0 ? rows / total : 0 };
};

/**
 * swappedLoss stage: (scores, codes) to the scalar loss. `apply` is the
 * differentiable form for a gradient tape (inputs assumed to fit the layout);
 * `run` checks them, fails with CropLayoutError when they do not fit, and its
 * loss is owned by the caller's scope.
 *
 * @example Equal scores give every prototype the same probability: the loss is log K
 * ```ts
 * import * as tf from "@tensorflow/tfjs";
 * import { Effect } from "effect";
 * import assert from "node:assert/strict";
 * import { configure, initBackend, swappedLossStage } from "@swav/swav-ts";
 *
 * await initBackend("cpu");
 * const loss = await Effect.runPromise(Effect.scoped(Effect.gen(function* () {
 *   const swappedLoss = yield* configure(swappedLossStage, { nmbCrops: [2], cropsForAssign: [0, 1] });
 *   const scores = tf.zeros<tf.Rank.R2>([2 * 3, 5]); // 2 crops of 3 samples, 5 prototypes
 *   const codes = [tf.oneHot([0, 1, 2], 5).toFloat() as tf.Tensor2D, tf.fill<tf.Rank.R2>([3, 5], 0.2)];
 *   const value = yield* swappedLoss({ scores, codes }); // disposed with the scope
 *   tf.dispose([scores, ...codes]);
 *   return (yield* Effect.promise(() => value.data()))[0]!;
 * })));
 * assert.ok(Math.abs(loss - Math.log(5)) < 1e-5);
 * ```
 */
export const swappedLossStage: TensorStage<
  SwappedLossInput,
  Scalar,
  SwappedLossConfig,
  CropLayoutError,
  Scope.Scope
> = defineTensorStage<
  SwappedLossInput,
  tf.Scalar,
  SwappedLossConfig,
  CropLayoutError,
  Scope.Scope
>({
  name: "swappedLoss",
  config: SwappedLossConfig,
  apply: (config) => ({ scores, codes }) => lossFromCodes(scores, codes, layoutOf(config, scores.shape[0])),
  run: (config) => ({ scores, codes }) =>
    Effect.suspend(() => {
      const options = layoutOf(config, scores.shape[0]);
      const problem = inputProblem(options, scores, { codes });
      if (problem !== undefined) return Effect.fail(new CropLayoutError({ message: problem }));
      return Effect.acquireRelease(
        Effect.sync(() => lossFromCodes(scores, codes, options)),
        (loss) => Effect.sync(() => loss.dispose()),
      );
    }),
});
