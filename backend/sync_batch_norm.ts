/**
 * Synchronised batch norm's collectives (PyTorch's SyncBatchNorm semantics),
 * shared by the tensor-op and oneDNN paths of backend/batch_norm.ts.
 *
 * When the communicator has several ranks and the `syncBatchNorm` kernel
 * setting is on, each rank's batch is a shard of one global batch:
 *
 * - forward: the mean and the biased variance are those of the global batch.
 *   The mean comes from all-reduced per-channel sums (count · local mean, with
 *   the counts), then the variance from all-reduced sums of squares centred on
 *   that global mean (Chan et al.'s combination where only local moments are
 *   known), which avoids E[x²] − E[x]²'s cancellation. Both in float64.
 * - backward: dx needs Σ dy and Σ dy·x̂ over the global batch; those per-channel
 *   sums are all-reduced (float64). dgamma and dbeta stay this rank's own sums,
 *   as SyncBatchNorm returns them: the data-parallel gradient all-reduce then
 *   averages them with every other parameter's gradient.
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

/** The global mean per channel from this rank's mean over `count` values, and the global count. */
export const globalMean = (
  world: Communicator,
  localMean: ArrayLike<number>,
  count: number,
): { readonly mean: Float64Array; readonly count: number } => {
  const channels = localMean.length;
  const sums = new Float64Array(channels + 1);
  for (let c = 0; c < channels; c++) sums[c] = localMean[c]! * count;
  sums[channels] = count;
  world.allReduce(sums, "sum");
  const total = sums[channels]!;
  return { mean: sums.subarray(0, channels).map((s) => s / total), count: total };
};

/**
 * The global biased variance per channel from this rank's mean of squared
 * deviations from the global mean (over `count` values) and the global count.
 */
export const globalVariance = (
  world: Communicator,
  localMeanSquare: ArrayLike<number>,
  count: number,
  globalCount: number,
): Float64Array => {
  const sums = Float64Array.from(localMeanSquare, (m) => m * count);
  world.allReduce(sums, "sum");
  return sums.map((s) => s / globalCount);
};

/**
 * Global moments from this rank's mean and biased variance over `count` values:
 * Σ_r n_r·(var_r + (mean_r − M)²) / N, with M the global mean.
 */
export const combineMoments = (
  world: Communicator,
  localMean: ArrayLike<number>,
  localVariance: ArrayLike<number>,
  count: number,
): { readonly mean: Float64Array; readonly variance: Float64Array; readonly count: number } => {
  const { mean, count: total } = globalMean(world, localMean, count);
  const square = Float64Array.from(localVariance, (v, c) => v + (localMean[c]! - mean[c]!) ** 2);
  return { mean, variance: globalVariance(world, square, count, total), count: total };
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
