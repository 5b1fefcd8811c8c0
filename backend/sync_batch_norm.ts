/**
 * Synchronised batch norm's collectives (PyTorch's SyncBatchNorm semantics),
 * shared by the tensor-op and oneDNN paths of backend/batch_norm.ts.
 *
 * When the communicator has several ranks and the `syncBatchNorm` kernel
 * setting is on, each rank's batch is a shard of one global batch:
 *
 * - forward: the mean and the biased variance are those of the global batch,
 *   combined from each rank's own (centred, two-pass) moments and counts in one
 *   float64 all-reduce (Chan et al.'s pairwise combination; see `combineMoments`).
 * - backward: dx needs Σ dy and Σ dy·x̂ over the global batch; those per-channel
 *   sums are all-reduced (float64). dgamma and dbeta stay this rank's own sums,
 *   as SyncBatchNorm returns them: the data-parallel gradient all-reduce then
 *   averages them with every other parameter's gradient.
 *
 * One all-reduce in the forward and one in the backward per batch-norm call:
 * on a busy machine each collective waits for every rank to be scheduled, so
 * their number, not their few kilobytes, is the cost.
 *
 * Every rank must run the same sequence of batch norms (same layers, same
 * channel counts), as every rank of a data-parallel step does.
 */
import { activeCommunicator, type Communicator } from "./communicator.ts";
import { activeKernelSettings } from "./kernel_settings.ts";

/** The world batch norm synchronises over now, or undefined (one rank, or the setting off). */
export const batchNormSyncWorld = (): Communicator | undefined => {
  const world = activeCommunicator();
  return world.size > 1 && activeKernelSettings().syncBatchNorm ? world : undefined;
};

/**
 * Global moments from this rank's mean and biased variance over `count` values,
 * in one all-reduce of [Σ n·mean, Σ n·(var + mean²), Σ n] (float64): M = Σ n·mean / N
 * and V = Σ n·(var + mean²) / N − M², which is Σ_r n_r·(var_r + (mean_r − M)²) / N.
 * The subtraction loses ~1e−16·(1 + M²/V) of V in float64, below float32's
 * rounding for any channel whose |mean| / std is under ~10⁴ (beyond that float32
 * activations cannot resolve their own variance either).
 */
export const combineMoments = (
  world: Communicator,
  localMean: ArrayLike<number>,
  localVariance: ArrayLike<number>,
  count: number,
): { readonly mean: Float64Array; readonly variance: Float64Array; readonly count: number } => {
  const channels = localMean.length;
  const sums = new Float64Array(2 * channels + 1);
  for (let c = 0; c < channels; c++) {
    const m = localMean[c]!;
    sums[c] = count * m;
    sums[channels + c] = count * (localVariance[c]! + m * m);
  }
  sums[2 * channels] = count;
  world.allReduce(sums, "sum");
  const total = sums[2 * channels]!;
  const mean = new Float64Array(channels);
  const variance = new Float64Array(channels);
  for (let c = 0; c < channels; c++) {
    mean[c] = sums[c]! / total;
    variance[c] = Math.max(0, sums[channels + c]! / total - mean[c]! * mean[c]!);
  }
  return { mean, variance, count: total };
};

/**
 * Σ dy and Σ dy·x̂ per channel over every rank, from this rank's sums:
 * [Σ dy (C values), Σ dy·x̂ (C values)].
 */
export const globalGradientSums = (
  world: Communicator,
  sumDy: ArrayLike<number>,
  sumDyXhat: ArrayLike<number>,
): Float64Array => {
  const channels = sumDy.length;
  const sums = new Float64Array(2 * channels);
  for (let c = 0; c < channels; c++) {
    sums[c] = sumDy[c]!;
    sums[channels + c] = sumDyXhat[c]!;
  }
  world.allReduce(sums, "sum");
  return sums;
};
