/**
 * SimCLR's NT-Xent loss in solo-learn's multi-crop form (solo/losses/simclr.py):
 * every crop's unit-norm embedding is an anchor; its positives are the other
 * crops of the same image, its negatives every crop of another image; per
 * anchor −log(Σ exp(pos/τ) / (Σ exp(pos/τ) + Σ exp(neg/τ))), the loss the mean
 * over anchors. With two crops this is the SimCLR paper's loss.
 *
 * Computed as log-sum-exps over masked similarities (an additive −1e9 mask, not
 * −∞, so that the gradient stays finite): the same value, without overflow.
 */
import * as tf from "@tensorflow/tfjs";
import type { Scalar, Tensor2D } from "../backend/tensor_types.ts";
import { Schema, type Scope } from "effect";
import { Positive, withDefault } from "../models/schema.ts";
import { type TensorStage, tensorStage } from "./stage.ts";

/** A validated ntXent config. */
export interface NtXentConfig {
  /** Softmax temperature τ (default 0.1). */
  readonly temperature: number;
}

/** The ntXent stage's config schema. */
export const NtXentConfig: Schema.Codec<NtXentConfig, Partial<NtXentConfig>> = Schema.Struct({
  /** Softmax temperature τ (SimCLR's 0.1 in solo-learn). */
  temperature: withDefault(Positive, 0.1),
});

/** What SimCLR's loss takes: every crop's embedding and the batch size that groups them by image. */
export interface NtXentInput {
  /** Unit-norm embeddings [crops * batch, D], crop-major: row c·B + i is crop c of image i. */
  readonly embeddings: Tensor2D;
  /** Images in the batch (rows per crop). */
  readonly batchSize: number;
  /**
   * Data parallel: every rank's embeddings gathered crop-major over the global batch (row
   * c·B·ranks + r·B + i is rank r's row c·B + i), the candidates of this rank's anchors
   * (`embeddings`); the loss is then the mean over this rank's anchors. Absent: `embeddings`.
   */
  readonly gathered?:
    | { readonly all: Tensor2D; readonly rank: number; readonly ranks: number }
    | undefined;
}

/** Off-mask additive: exp(−1e9) is 0 in float32, and its gradient too. */
const MASKED = -1e9;

/**
 * The additive masks [anchors, N]: positives (same image, another crop) and candidates (every row
 * but the anchor). Anchor row c·b + i is column c·b·ranks + rank·b + i of the N gathered rows.
 */
const masks = (
  anchors: number,
  batchSize: number,
  rank: number,
  ranks: number,
): { positive: Tensor2D; candidates: Tensor2D } => {
  const global = batchSize * ranks;
  const n = anchors * ranks;
  const positive = new Float32Array(anchors * n).fill(MASKED);
  const candidates = new Float32Array(anchors * n).fill(0);
  for (let r = 0; r < anchors; r++) {
    const self = Math.floor(r / batchSize) * global + rank * batchSize + (r % batchSize);
    candidates[r * n + self] = MASKED;
    for (let c = self % global; c < n; c += global) if (c !== self) positive[r * n + c] = 0;
  }
  return { positive: tf.tensor2d(positive, [anchors, n]), candidates: tf.tensor2d(candidates, [anchors, n]) };
};

/**
 * The NT-Xent loss (a scalar on the caller's tape).
 *
 * @example Matching crops give a lower loss than unrelated ones
 * ```ts
 * import * as tf from "@tensorflow/tfjs";
 * import assert from "node:assert/strict";
 * import { initBackend, l2NormaliseRows, ntXent } from "@swav/swav-ts";
 *
 * await initBackend("cpu");
 * const images = l2NormaliseRows(tf.randomNormal<tf.Rank.R2>([4, 8], 0, 1, "float32", 1));
 * const matching = tf.concat([images, images]); // crop 1 of image i is crop 0 of image i
 * const unrelated = tf.concat([images, l2NormaliseRows(tf.randomNormal<tf.Rank.R2>([4, 8], 0, 1, "float32", 2))]);
 * const low = (await ntXent({ embeddings: matching, batchSize: 4 }, { temperature: 0.1 }).data())[0]!;
 * const high = (await ntXent({ embeddings: unrelated, batchSize: 4 }, { temperature: 0.1 }).data())[0]!;
 * assert.ok(low < high);
 * ```
 */
export const ntXent = (input: NtXentInput, config: NtXentConfig): Scalar =>
  tf.tidy(() => {
    const anchors = input.embeddings.shape[0];
    const { all, rank, ranks } = input.gathered ?? { all: input.embeddings, rank: 0, ranks: 1 };
    const { positive, candidates } = masks(anchors, input.batchSize, rank, ranks);
    const sim = tf.div(tf.matMul(input.embeddings, all, false, true), config.temperature);
    const logPos = tf.logSumExp(tf.add(sim, positive), 1);
    const logAll = tf.logSumExp(tf.add(sim, candidates), 1);
    return tf.mean(tf.sub(logAll, logPos)) as Scalar;
  });

/** The ntXent stage value: SimCLR's loss as a tensor stage (`apply` for the gradient tape). */
export const ntXentStage: TensorStage<NtXentInput, Scalar, NtXentConfig, never, Scope.Scope> = tensorStage<
  NtXentInput,
  Scalar,
  NtXentConfig
>({
  name: "ntXent",
  config: NtXentConfig,
  apply: (config) => (input) => ntXent(input, config),
});
