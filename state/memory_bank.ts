/**
 * DeepCluster-v2's memory bank and targets: for each crop in cropsForAssign,
 * the detached unit-norm embedding of every sample seen since the last
 * clustering (the reference's `local_memory_embeddings`, kept here by global
 * sample id instead of by position, so that its content does not depend on the
 * order of the writes or the number of processes), and each sample's target
 * per head from the last k-means (−100 for a sample not in the bank).
 *
 * Host memory (Float32Array), owned by the run; saved whole in checkpoints so
 * that a run resumes exactly mid-epoch.
 */
import { NO_TARGET } from "../stages/cluster_loss.ts";

/** DeepCluster-v2's memory bank: the last epoch's embeddings of every sample per assignment crop, and each sample's k-means target per head. */
export interface MemoryBank {
  /** Samples of the data set (rows per bank). */
  readonly size: number;
  /** Embedding size (row length). */
  readonly dim: number;
  /** One [size, dim] bank per assignment crop. */
  readonly banks: Float32Array[];
  /** 1 where the sample's rows were written since the last clustering. */
  readonly present: Uint8Array;
  /** One target per sample per head. */
  readonly targets: Int32Array[];
  /** Whether the bank was ever filled (the initial pass has run). */
  filled: boolean;
}

/** An empty memory bank for `size` samples: `crops` banks of `dim`-wide rows, `heads` target lists. */
export const makeMemoryBank = (options: {
  readonly size: number;
  readonly dim: number;
  readonly crops: number;
  readonly heads: number;
}): MemoryBank => ({
  size: options.size,
  dim: options.dim,
  banks: Array.from({ length: options.crops }, () => new Float32Array(options.size * options.dim)),
  present: new Uint8Array(options.size),
  targets: Array.from({ length: options.heads }, () => new Int32Array(options.size).fill(NO_TARGET)),
  filled: false,
});

/**
 * Writes a batch: `embeddings` [crops * batch, dim] crop-major (all crops of a step, or only the
 * assignment crops of the initial pass), `cropRows[i]` the crop whose rows go into bank i.
 */
export const writeBatch = (
  bank: MemoryBank,
  indices: Int32Array,
  embeddings: Float32Array,
  cropRows: readonly number[],
): void => {
  const rows = indices.length * bank.dim;
  cropRows.forEach((crop, i) =>
    writeCrop(bank, i, indices, embeddings.subarray(crop * rows, (crop + 1) * rows))
  );
};

/** Writes one crop's embeddings [batch, dim] of the samples `indices` into bank `i`. */
export const writeCrop = (
  bank: MemoryBank,
  i: number,
  indices: Int32Array,
  embeddings: Float32Array,
): void => {
  const { dim } = bank;
  indices.forEach((sample, b) => {
    bank.banks[i]!.set(embeddings.subarray(b * dim, (b + 1) * dim), sample * dim);
    bank.present[sample] = 1;
  });
};

/** The ids of the samples in the bank, ascending. */
export const presentIds = (bank: MemoryBank): Int32Array => {
  const ids: number[] = [];
  bank.present.forEach((p, i) => {
    if (p === 1) ids.push(i);
  });
  return Int32Array.from(ids);
};

/** The rows of bank `i` for `ids`, packed [ids.length, dim]. */
export const rowsOf = (bank: MemoryBank, i: number, ids: Int32Array): Float32Array => {
  const out = new Float32Array(ids.length * bank.dim);
  ids.forEach((id, r) => out.set(bank.banks[i]!.subarray(id * bank.dim, (id + 1) * bank.dim), r * bank.dim));
  return out;
};

/** The batch's targets, one Int32Array per head. */
export const batchTargets = (bank: MemoryBank, indices: Int32Array): Int32Array[] =>
  bank.targets.map((t) => indices.map((i) => t[i]!));
