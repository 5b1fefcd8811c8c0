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
import { Schema } from "effect";
import { Positive, withDefault } from "../models/schema.ts";
import { tensorStage } from "./stage.ts";

export const NtXentConfig = Schema.Struct({
  /** Softmax temperature τ (SimCLR's 0.1 in solo-learn). */
  temperature: withDefault(Positive, 0.1),
});
export type NtXentConfig = typeof NtXentConfig.Type;

export interface NtXentInput {
  /** Unit-norm embeddings [crops * batch, D], crop-major: row c·B + i is crop c of image i. */
  readonly embeddings: tf.Tensor2D;
  readonly batchSize: number;
  /**
   * Data parallel: every rank's embeddings gathered crop-major over the global batch (row
   * c·B·ranks + r·B + i is rank r's row c·B + i), the candidates of this rank's anchors
   * (`embeddings`); the loss is then the mean over this rank's anchors. Absent: `embeddings`.
   */
  readonly gathered?:
    | { readonly all: tf.Tensor2D; readonly rank: number; readonly ranks: number }
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
): { positive: tf.Tensor2D; candidates: tf.Tensor2D } => {
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

/** The NT-Xent loss (a scalar on the caller's tape). */
export const ntXent = (input: NtXentInput, config: NtXentConfig): tf.Scalar =>
  tf.tidy(() => {
    const anchors = input.embeddings.shape[0];
    const { all, rank, ranks } = input.gathered ?? { all: input.embeddings, rank: 0, ranks: 1 };
    const { positive, candidates } = masks(anchors, input.batchSize, rank, ranks);
    const sim = tf.div(tf.matMul(input.embeddings, all, false, true), config.temperature);
    const logPos = tf.logSumExp(tf.add(sim, positive), 1);
    const logAll = tf.logSumExp(tf.add(sim, candidates), 1);
    return tf.mean(tf.sub(logAll, logPos)) as tf.Scalar;
  });

/** The ntXent stage value. */
export const ntXentStage = tensorStage<NtXentInput, tf.Scalar, NtXentConfig>({
  name: "ntXent",
  config: NtXentConfig,
  apply: (config) => (input) => ntXent(input, config),
});
