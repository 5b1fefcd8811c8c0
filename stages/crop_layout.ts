/**
 * How a batch's crops are laid out in the score matrix, shared by the sinkhorn
 * and swappedLoss stages: crop-major, rows [bs·v, bs·(v+1)) belong to crop v.
 */
import { Schema } from "effect";

/** The crop layout of a batch's score rows: samples per crop, crops per resolution, and the assignment crops. */
export interface CropLayout {
  /** Samples per crop (per process in the reference). */
  readonly batchSize: number;
  /** Crops per resolution group, e.g. [2, 6]: the total is their sum. */
  readonly nmbCrops: readonly number[];
  /** Indices of the crops whose codes are predicted (the reference's [0, 1]). */
  readonly cropsForAssign: readonly number[];
}

/** A crop layout that does not fit the scores it is applied to. */
export class CropLayoutError extends Schema.TaggedError<CropLayoutError>()("CropLayoutError", {
  message: Schema.String,
}) {}

export const totalCrops = (nmbCrops: readonly number[]): number => nmbCrops.reduce((a, b) => a + b, 0);

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

/**
 * The problem with scores (rank, rows) and, when given, the codes and queue
 * scores for `layout`, or undefined when they fit.
 */
export const inputProblem = (
  layout: CropLayout,
  scores: { readonly rank: number; readonly shape: readonly number[] },
  parts: {
    readonly codes?: readonly { readonly shape: readonly number[] }[] | undefined;
    readonly queueScores?: readonly unknown[] | undefined;
  } = {},
): string | undefined => {
  if (scores.rank !== 2) return `scores must be [rows, K], got [${scores.shape}]`;
  const problem = cropLayoutProblem(layout, scores.shape[0]!);
  if (problem !== undefined) return problem;
  const n = layout.cropsForAssign.length;
  const { codes, queueScores } = parts;
  if (queueScores !== undefined && queueScores.length !== n) {
    return `queueScores has ${queueScores.length} entries, expected one per assignment crop (${n})`;
  }
  if (codes === undefined) return undefined;
  if (codes.length !== n) return `got ${codes.length} codes, expected one per assignment crop (${n})`;
  const [bs, k] = [layout.batchSize, scores.shape[1]];
  const bad = codes.find((q) => q.shape[0] !== bs || q.shape[1] !== k);
  return bad === undefined ? undefined : `codes must be [${bs}, ${k}], got [${bad.shape}]`;
};
