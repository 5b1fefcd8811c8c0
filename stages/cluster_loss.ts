/**
 * DeepCluster-v2's loss (main_deepclusterv2.py, `train`): for each prototype
 * head h, the cross-entropy of every crop's scores z·W_hᵀ / τ against the
 * sample's target (its cluster from the epoch's k-means), targets repeated for
 * every crop; samples without a target (−100, not in the memory bank) are left
 * out, as torch's `ignore_index`; the mean over heads.
 */
import * as tf from "@tensorflow/tfjs";
import type { Scalar, Tensor2D } from "../backend/tensor_types.ts";
import { Schema, type Scope } from "effect";
import { prototypeScores } from "../models/prototypes.ts";
import { Positive, withDefault } from "../models/schema.ts";
import { type TensorStage, tensorStage } from "./stage.ts";

/** The target of a sample that has none (torch's ignore_index). */
export const NO_TARGET = -100;

/** A validated clusterLoss config. */
export interface ClusterLossConfig {
  /** Softmax temperature (default 0.1). */
  readonly temperature: number;
}

/** The clusterLoss stage's config schema. */
export const ClusterLossConfig: Schema.Codec<ClusterLossConfig, Partial<ClusterLossConfig>> = Schema.Struct({
  /** Softmax temperature (the reference's 0.1). */
  temperature: withDefault(Positive, 0.1),
});

/** What DeepCluster-v2's loss takes: the embeddings, each head's prototypes and each sample's cluster per head. */
export interface ClusterLossInput {
  /** Unit-norm embeddings [crops * batch, D], crop-major. */
  readonly embeddings: Tensor2D;
  /** One weight [K_h, D] per head. */
  readonly prototypes: readonly Tensor2D[];
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
  scores: Tensor2D,
  targets: Int32Array,
  crops: number,
  temperature: number,
  divisor?: number,
): Scalar =>
  tf.tidy(() => {
    const rows = new Int32Array(targets.length * crops);
    for (let c = 0; c < crops; c++) rows.set(targets, c * targets.length);
    // tf.oneHot gives a zero row for −1: a row without target adds nothing.
    const indices = rows.map((t) => (t === NO_TARGET ? -1 : t));
    const counted = indices.reduce((n, t) => n + (t >= 0 ? 1 : 0), 0);
    const oneHot = tf.cast(tf.oneHot(tf.tensor1d(indices, "int32"), scores.shape[1]), "float32");
    const logP = tf.logSoftmax(tf.div(scores, temperature));
    return tf.div(tf.neg(tf.sum(tf.mul(oneHot, logP))), divisor ?? Math.max(1, counted)) as Scalar;
  });

/**
 * The loss: the heads' cross-entropies averaged.
 *
 * @example Targets that match the nearest prototype cost less than wrong ones
 * ```ts
 * import * as tf from "@tensorflow/tfjs";
 * import assert from "node:assert/strict";
 * import { clusterLoss, initBackend } from "@swav/swav-ts";
 *
 * await initBackend("cpu");
 * const prototypes = [tf.eye(3) as tf.Tensor2D]; // one head of K = 3 prototypes of size 3
 * const embeddings = tf.concat([tf.eye(3), tf.eye(3)]) as tf.Tensor2D; // 2 crops of 3 samples
 * const loss = async (targets: number[]) =>
 *   (await clusterLoss({ embeddings, prototypes, targets: [new Int32Array(targets)] }, { temperature: 0.1 }).data())[0]!;
 * assert.ok((await loss([0, 1, 2])) < (await loss([1, 2, 0])));
 * ```
 */
export const clusterLoss = (input: ClusterLossInput, config: ClusterLossConfig): Scalar =>
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
    return tf.div(losses.length === 1 ? losses[0]! : tf.addN(losses), losses.length) as Scalar;
  });

/** The clusterLoss stage value: DeepCluster-v2's loss as a tensor stage (`apply` for the gradient tape). */
export const clusterLossStage: TensorStage<ClusterLossInput, Scalar, ClusterLossConfig, never, Scope.Scope> =
  tensorStage<ClusterLossInput, Scalar, ClusterLossConfig>({
    name: "clusterLoss",
    config: ClusterLossConfig,
    apply: (config) => (input) => clusterLoss(input, config),
  });
