/**
 * DeepCluster-v2's loss (main_deepclusterv2.py, `train`): for each prototype
 * head h, the cross-entropy of every crop's scores z·W_hᵀ / τ against the
 * sample's target (its cluster from the epoch's k-means), targets repeated for
 * every crop; samples without a target (−100, not in the memory bank) are left
 * out, as torch's `ignore_index`; the mean over heads.
 */
import * as tf from "@tensorflow/tfjs";
import { Schema } from "effect";
import { prototypeScores } from "../models/prototypes.ts";
import { Positive, withDefault } from "../models/schema.ts";
import { tensorStage } from "./stage.ts";

/** The target of a sample that has none (torch's ignore_index). */
export const NO_TARGET = -100;

export const ClusterLossConfig = Schema.Struct({
  /** Softmax temperature (the reference's 0.1). */
  temperature: withDefault(Positive, 0.1),
});
export type ClusterLossConfig = typeof ClusterLossConfig.Type;

export interface ClusterLossInput {
  /** Unit-norm embeddings [crops * batch, D], crop-major. */
  readonly embeddings: tf.Tensor2D;
  /** One weight [K_h, D] per head. */
  readonly prototypes: readonly tf.Tensor2D[];
  /** One target per sample of the batch per head (NO_TARGET: none). */
  readonly targets: readonly Int32Array[];
  /**
   * Per head, what the summed cross-entropy is divided by; absent: the rows here with a target
   * (at least 1). Data parallel: the global batch's count over the ranks.
   */
  readonly divisors?: readonly number[] | undefined;
}

/** One head's mean cross-entropy over the rows that have a target (0 when none has). */
const headLoss = (
  scores: tf.Tensor2D,
  targets: Int32Array,
  crops: number,
  temperature: number,
  divisor?: number,
): tf.Scalar =>
  tf.tidy(() => {
    const rows = new Int32Array(targets.length * crops);
    for (let c = 0; c < crops; c++) rows.set(targets, c * targets.length);
    // tf.oneHot gives a zero row for −1: a row without target adds nothing.
    const indices = rows.map((t) => (t === NO_TARGET ? -1 : t));
    const counted = indices.reduce((n, t) => n + (t >= 0 ? 1 : 0), 0);
    const oneHot = tf.cast(tf.oneHot(tf.tensor1d(indices, "int32"), scores.shape[1]), "float32");
    const logP = tf.logSoftmax(tf.div(scores, temperature));
    return tf.div(tf.neg(tf.sum(tf.mul(oneHot, logP))), divisor ?? Math.max(1, counted)) as tf.Scalar;
  });

/** The loss: the heads' cross-entropies averaged. */
export const clusterLoss = (input: ClusterLossInput, config: ClusterLossConfig): tf.Scalar =>
  tf.tidy(() => {
    const batch = input.targets[0]?.length ?? 0;
    const crops = batch === 0 ? 0 : input.embeddings.shape[0] / batch;
    const losses = input.prototypes.map((w, h) =>
      headLoss(
        prototypeScores(input.embeddings, w),
        input.targets[h]!,
        crops,
        config.temperature,
        input.divisors?.[h],
      )
    );
    return tf.div(losses.length === 1 ? losses[0]! : tf.addN(losses), losses.length) as tf.Scalar;
  });

/** The clusterLoss stage value. */
export const clusterLossStage = tensorStage<ClusterLossInput, tf.Scalar, ClusterLossConfig>({
  name: "clusterLoss",
  config: ClusterLossConfig,
  apply: (config) => (input) => clusterLoss(input, config),
});
