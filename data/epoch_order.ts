/**
 * Which samples an epoch reads and in what order: a seeded permutation keyed by
 * (seed, epoch), and each rank's shard of it (PyTorch's DistributedSampler).
 */
import { rngFor } from "./rng.ts";

/**
 * The sample order of an epoch: a permutation keyed by (seed, epoch), or 0..n-1
 * without shuffling (lazily, so an unshuffled source may be arbitrarily long).
 */
export const epochOrder = (length: number, seed: number, epoch: number, shuffle = true): Iterable<number> =>
  shuffle ? rngFor(seed, epoch).permutation(length) : {
    *[Symbol.iterator]() {
      for (let i = 0; i < length; i++) yield i;
    },
  };

/**
 * Rank `rank`'s part of an epoch's `order` among `size` ranks, with PyTorch's
 * `DistributedSampler` semantics: the order is padded to a multiple of `size`
 * by wrapping around to its start, and rank r takes positions r, r + size,
 * r + 2·size, ... Every rank computes the same order (same seed and epoch), so
 * the shards are disjoint apart from the padding and together cover the epoch.
 * Local batch k of every rank together is then positions [k·B, (k+1)·B) of the
 * padded order (B = size · local batch): one process's batch k, as a set.
 */
export const shardOrder = (order: Iterable<number>, rank: number, size: number): number[] => {
  const all = [...order];
  if (size <= 1 || all.length === 0) return all;
  const total = Math.ceil(all.length / size) * size;
  const out: number[] = [];
  for (let position = rank; position < total; position += size) out.push(all[position % all.length]!);
  return out;
};

/** Samples per epoch a rank reads: the padded epoch's share. */
export const shardLength = (length: number, size: number): number =>
  size <= 1 ? length : Math.ceil(length / size);
