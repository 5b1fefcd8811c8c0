/**
 * What data-parallel training adds for DeepCluster-v2 and SimCLR, over the
 * communicator: the memory bank's rows merged for rank 0's checkpoint and owned
 * again after a resume, and SimCLR's all-gather of the embeddings with the
 * gradient flowing back through it. In a world of one each is an identity.
 *
 * The memory bank is kept by global sample id on every rank; a rank writes the
 * rows of its own shard's samples and marks them present, so that each sample
 * present since the last clustering is present on exactly one rank (the k-means
 * counts every sample once; pipelines/deepclusterv2.ts).
 */
import * as tf from "@tensorflow/tfjs";
import type { Communicator } from "../backend/communicator.ts";
import type { MemoryBank } from "../state/memory_bank.ts";

/** 1 where the sample is present on some rank (the bank's presence over the whole job). */
export const globalPresence = (bank: MemoryBank, comm: Communicator): Uint8Array => {
  if (comm.size === 1) return bank.present;
  const present = Float32Array.from(bank.present);
  comm.allReduce(present, "max");
  return Uint8Array.from(present);
};

/** What k-means sums over the ranks each iteration (the clusters' sums and counts); undefined on one rank. */
export const kmeansReduce = (
  comm: Communicator,
): ((sums: Float64Array, counts: Float64Array) => void) | undefined =>
  comm.size === 1 ? undefined : (sums, counts) => {
    comm.allReduce(sums, "sum");
    comm.allReduce(counts, "sum");
  };

/**
 * The starting centroids [K, dim]: the global present ids' rows at `start`, each from the rank holding it;
 * undefined on one rank, where k-means takes them from its own rows.
 */
export const startCentroids = (
  bank: MemoryBank,
  i: number,
  globalIds: Int32Array,
  start: Int32Array,
  comm: Communicator,
): Float32Array | undefined => {
  if (comm.size === 1) return undefined;
  const { dim } = bank;
  const out = new Float32Array(start.length * dim);
  start.forEach((position, c) => {
    const id = globalIds[position]!;
    if (bank.present[id] === 1) out.set(bank.banks[i]!.subarray(id * dim, (id + 1) * dim), c * dim);
  });
  comm.allReduce(out, "sum");
  return out;
};

/**
 * Data parallel, per head: what this rank's summed cross-entropy is divided by, the global batch's
 * count of rows with a target over the ranks, so that the ranks' mean loss (and mean gradient) is
 * the global batch's, whichever rank holds the samples without target. Collective; undefined on one
 * rank (the loss is the batch's own mean).
 */
export const lossDivisors = (
  targets: readonly Int32Array[],
  crops: number,
  comm: Communicator,
): number[] | undefined =>
  comm.size === 1 ? undefined : targets.map((t) => {
    const counted = Float64Array.of(t.reduce((n, x) => n + (x >= 0 ? crops : 0), 0));
    comm.allReduce(counted, "sum");
    return Math.max(1, counted[0]!) / comm.size;
  });

/**
 * The bank as one process would hold it (every present row from the rank that has it, the
 * targets, which every rank holds whole), for rank 0's checkpoint. Collective; in a world of one
 * the bank itself. Rows present nowhere are rank 0's (unused: the next clustering skips them).
 */
export const mergedBank = (bank: MemoryBank, comm: Communicator): MemoryBank => {
  if (comm.size === 1) return bank;
  const present = globalPresence(bank, comm);
  const { dim } = bank;
  const banks = bank.banks.map((rows) => {
    const mine = new Float32Array(rows.length);
    bank.present.forEach((p, id) => {
      if (p === 1) mine.set(rows.subarray(id * dim, (id + 1) * dim), id * dim);
    });
    comm.allReduce(mine, "sum");
    present.forEach((p, id) => {
      if (p === 0) mine.set(rows.subarray(id * dim, (id + 1) * dim), id * dim);
    });
    return mine;
  });
  return { ...bank, banks, present, targets: bank.targets };
};

/**
 * After a resume every rank holds the checkpoint's whole bank: rank r keeps as its own the
 * present samples whose id is r mod size, so that each is still counted once. In place.
 */
export const ownRestoredBank = (bank: MemoryBank, comm: Pick<Communicator, "rank" | "size">): void => {
  if (comm.size === 1) return;
  bank.present.forEach((p, id) => {
    if (p === 1 && id % comm.size !== comm.rank) bank.present[id] = 0;
  });
};

/**
 * Every rank's rows [crops · b, D] (crop-major, b images a rank) gathered crop-major over the
 * global batch: row c·B + r·b + i is rank r's row c·b + i (B = b · size). The gradient flows back
 * as solo-learn's `full_gather`: the gradient with respect to the gathered matrix summed over the
 * ranks (each rank's anchors reach every rank's rows), then this rank's rows taken. A world of
 * one returns `rows` itself. Synchronous (it runs on the tape).
 */
export const allGatherRows = (rows: tf.Tensor2D, crops: number, comm: Communicator): tf.Tensor2D => {
  if (comm.size === 1) return rows;
  const [n, dim] = rows.shape;
  const b = n / crops;
  const total = n * comm.size;
  const at = (c: number) => (c * b * comm.size + comm.rank * b) * dim;
  const op = tf.customGrad((...args: (tf.Tensor | tf.GradSaveFunc)[]) => {
    const x = args[0] as tf.Tensor;
    const all = new Float32Array(total * dim);
    const mine = x.dataSync() as Float32Array;
    for (let c = 0; c < crops; c++) all.set(mine.subarray(c * b * dim, (c + 1) * b * dim), at(c));
    // Adding zeros is exact: the sum is every rank's rows in place.
    comm.allReduce(all, "sum");
    return {
      value: tf.tensor2d(all, [total, dim]),
      gradFunc: (dy: tf.Tensor) => {
        const grad = Float32Array.from(dy.dataSync() as Float32Array);
        comm.allReduce(grad, "sum");
        const own = new Float32Array(n * dim);
        for (let c = 0; c < crops; c++) own.set(grad.subarray(at(c), at(c) + b * dim), c * b * dim);
        return tf.tensor2d(own, [n, dim]);
      },
    };
  });
  return op(rows) as tf.Tensor2D;
};

/**
 * SimCLR's candidates over the ranks: every rank's embeddings (`allGatherRows`) and this rank's place,
 * for the NT-Xent loss; undefined on one rank, where the batch's own embeddings are the candidates.
 */
export const gatheredRows = (rows: tf.Tensor2D, crops: number, comm: Communicator) =>
  comm.size === 1 ? undefined : { all: allGatherRows(rows, crops, comm), rank: comm.rank, ranks: comm.size };

/** Mean over dimensions of the rows' standard deviation, read asynchronously. */
export const embeddingStd = async (embeddings: tf.Tensor2D): Promise<number> => {
  const std = tf.tidy(() => tf.mean(tf.sqrt(tf.moments(embeddings, 0).variance)));
  try {
    return (await std.data())[0]!;
  } finally {
    std.dispose();
  }
};

/**
 * The mean over dimensions of the global batch's standard deviation of `rows` [n, D] (every
 * rank's rows, moments summed in float64 over the ranks). Collective; on one rank `embeddingStd`.
 */
export const embeddingStdOverRanks = async (rows: tf.Tensor2D, comm: Communicator): Promise<number> => {
  if (comm.size === 1) return embeddingStd(rows);
  const [n, dim] = rows.shape;
  const values = await rows.data();
  const moments = new Float64Array(2 * dim + 1);
  moments[2 * dim] = n;
  for (let r = 0; r < n; r++) {
    for (let j = 0; j < dim; j++) {
      const v = values[r * dim + j]!;
      moments[j]! += v;
      moments[dim + j]! += v * v;
    }
  }
  comm.allReduce(moments, "sum");
  const count = moments[2 * dim]!;
  let sum = 0;
  for (let j = 0; j < dim; j++) {
    const mean = moments[j]! / count;
    sum += Math.sqrt(Math.max(0, moments[dim + j]! / count - mean * mean));
  }
  return sum / dim;
};
