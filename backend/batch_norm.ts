/**
 * BatchNorm in train mode (batch statistics) with a closed-form gradient, for
 * any backend but laid out for the wasm one.
 *
 * tf.moments + tf.batchNorm differentiate op by op: FusedBatchNorm's gradient
 * tiles mean, variance and scale to the full activation shape, and moments'
 * gradient adds more full-size broadcasts. Here the backward is the textbook
 * one, over N = all values of a channel:
 *
 *   xhat   = (x − mean)·invstd,  invstd = 1/√(var + eps)   (var biased)
 *   dbeta  = Σ dy
 *   dgamma = Σ dy·xhat
 *   dx     = gamma·invstd · (dy − dbeta/N − xhat·dgamma/N)
 *
 * Two wasm-specific layout choices (measured in bench/kernels_bench.ts):
 * - per-channel broadcasts run on a view [rows, L·C] with a [L·C] vector
 *   (the [C] vector tiled L times, L·C ≥ 256): tfjs-backend-wasm's broadcasting
 *   binary ops cost ~25x a same-shape op when the broadcast row is short (C = 8),
 *   and as little as a same-shape op once rows are long;
 * - channel sums are an average pool over a [B, P, 1, C] view (XNNPACK, no
 *   copy) then a small [B, C] sum: Sum over axes (0, 1, 2) transposes the whole
 *   tensor first, and a ones·x matrix product makes XNNPACK pack x as weights
 *   (~30x slower on fresh tensors).
 */
import * as tf from "@tensorflow/tfjs";
import { BATCH_NORM_TRAIN, BATCH_NORM_TRAIN_GRAD, nativeBatchNormActive } from "./batch_norm_kernels.ts";
import { kernelInvariant } from "./invariant.ts";
import { batchNormSyncWorld, combineMoments, globalGradientSums } from "./sync_batch_norm.ts";
import type { Communicator } from "./communicator.ts";

/** Broadcast rows shorter than this are slow in tfjs-backend-wasm's binary ops. */
const MIN_ROW = 256;

/** Pool windows up to this size: a [B, P, 1, C] view with P | count, P ≤ MAX_WINDOW. */
const MAX_WINDOW = 4096;

/** The views of x [..., C] used by the per-channel operations. */
interface ChannelView {
  readonly channels: number;
  /** Values per channel. */
  readonly count: number;
  /** Broadcast view [rows, repeat·C]: `repeat` channel vectors per row. */
  readonly rows: number;
  readonly repeat: number;
  /** Reduction view [groups, window, 1, C]. */
  readonly groups: number;
  readonly window: number;
}

/** The smallest divisor of n that is ≥ lo (n itself if none is smaller). */
const divisorAtLeast = (n: number, lo: number): number => {
  for (let d = Math.max(1, lo); d < n; d++) if (n % d === 0) return d;
  return n;
};

/** The largest divisor of n that is ≤ hi. */
const divisorAtMost = (n: number, hi: number): number => {
  for (let d = Math.min(n, hi); d > 1; d--) if (n % d === 0) return d;
  return 1;
};

const channelView = (shape: readonly number[]): ChannelView => {
  const channels = shape[shape.length - 1]!;
  const count = shape.reduce((a, b) => a * b, 1) / channels;
  const repeat = divisorAtLeast(count, Math.ceil(MIN_ROW / channels));
  const window = divisorAtMost(count, MAX_WINDOW);
  return { channels, count, rows: count / repeat, repeat, groups: count / window, window };
};

/** v [C] repeated to the broadcast view's row [L·C]. */
const rowOf = (view: ChannelView, v: tf.Tensor): tf.Tensor1D =>
  (view.repeat === 1 ? v : tf.tile(v, [view.repeat])) as tf.Tensor1D;

/** Mean over all but the channel axis: [C]. */
const channelMean = (view: ChannelView, t: tf.Tensor): tf.Tensor1D => {
  const pooled = tf.avgPool(
    t.reshape([view.groups, view.window, 1, view.channels]) as tf.Tensor4D,
    [view.window, 1],
    [view.window, 1],
    "valid",
  ); // [groups, 1, 1, C]
  return tf.mean(pooled.reshape([view.groups, view.channels]), 0) as tf.Tensor1D;
};

/** What `batchNormTrain` returns. */
export interface BatchNormTrainOutput<T extends tf.Tensor> {
  /** gamma·(x − mean)/√(var + eps) + beta (then ReLU with `relu: true`); gradients flow to x, gamma, beta. */
  readonly y: T;
  /** Batch mean per channel [C] (carries no gradient; for running statistics). */
  readonly mean: tf.Tensor1D;
  /** Biased batch variance per channel [C] (carries no gradient; for running statistics). */
  readonly variance: tf.Tensor1D;
  /**
   * Values per channel the statistics are over: this batch's, or the global
   * batch's (all ranks) under synchronised batch norm; the unbiased running
   * variance divides by count − 1.
   */
  readonly count: number;
}

/**
 * The statistics kept out of a custom gradient's forward (which runs in a tidy
 * of its own), cloned into the caller's scope so its tidy frees them as usual.
 */
const intoCallerScope = (kept: { mean: tf.Tensor1D; variance: tf.Tensor1D }) => {
  const stats = { mean: tf.clone(kept.mean), variance: tf.clone(kept.variance) };
  kept.mean.dispose();
  kept.variance.dispose();
  return stats;
};

/**
 * BatchNorm over all axes but the last of x ([N, H, W, C], [N, C], ...) with
 * this batch's statistics, as torch's train mode normalises, optionally fused
 * with the ReLU that follows it. The tensor outputs belong to the caller's scope
 * (a tf.tidy disposes them as usual).
 *
 * Synchronised (backend/sync_batch_norm.ts: several ranks and the
 * `syncBatchNorm` setting on), the statistics are the global batch's and the
 * backward all-reduces Σ dy and Σ dy·x̂ for dx, as PyTorch's SyncBatchNorm; the
 * per-channel vectors cross to the host for the collectives (a cheap copy on
 * wasm and cpu, a synchronous read on webgpu). Otherwise nothing changes.
 */
export const batchNormTrain = <T extends tf.Tensor>(
  x: T,
  gamma: tf.Tensor1D,
  beta: tf.Tensor1D,
  epsilon: number,
  options: { readonly relu?: boolean } = {},
): BatchNormTrainOutput<T> => {
  const relu = options.relu ?? false;
  const shape = x.shape;
  const view = channelView(shape);
  const count = view.count;
  kernelInvariant(
    gamma.size === view.channels && beta.size === view.channels,
    () => `batchNormTrain: gamma/beta of size ${gamma.size}/${beta.size} for input [${shape}]`,
  );
  const world = batchNormSyncWorld();
  if (nativeBatchNormActive()) return nativeBatchNormTrain(x, gamma, beta, epsilon, relu, world, count);
  let globalCount = count;
  // The statistics leave the custom gradient's forward (which runs in its own
  // tidy, off the tape) kept; they are cloned into the caller's scope below.
  let stats: { mean: tf.Tensor1D; variance: tf.Tensor1D } | undefined;
  const op = tf.customGrad((...args: (tf.Tensor | tf.GradSaveFunc)[]) => {
    const [xIn, gammaIn, betaIn] = args as [tf.Tensor, tf.Tensor1D, tf.Tensor1D];
    const save = args[3] as tf.GradSaveFunc;
    const xv = xIn.reshape([view.rows, view.repeat * view.channels]) as tf.Tensor2D;
    let mean = channelMean(view, xv);
    const centred = tf.sub(xv, rowOf(view, mean)) as tf.Tensor2D;
    let variance = channelMean(view, tf.mul(centred, centred));
    let invStd: tf.Tensor1D;
    let xhat: tf.Tensor2D;
    if (world === undefined) {
      invStd = tf.rsqrt(tf.add(variance, epsilon)) as tf.Tensor1D;
      xhat = tf.mul(centred, rowOf(view, invStd)) as tf.Tensor2D;
    } else {
      // This rank's moments combined into the global batch's; x̂ = (x − M)·s = centred·s + (mean − M)·s.
      const global = combineMoments(world, mean.dataSync(), variance.dataSync(), count);
      globalCount = global.count;
      const localMean = mean;
      mean = tf.tensor1d(Float32Array.from(global.mean));
      variance = tf.tensor1d(Float32Array.from(global.variance));
      invStd = tf.rsqrt(tf.add(variance, epsilon)) as tf.Tensor1D;
      const offset = tf.mul(tf.sub(localMean, mean), invStd);
      xhat = tf.add(tf.mul(centred, rowOf(view, invStd)), rowOf(view, offset)) as tf.Tensor2D;
    }
    const normalised = tf.add(tf.mul(xhat, rowOf(view, gammaIn)), rowOf(view, betaIn));
    const yv = relu ? tf.relu(normalised) : normalised;
    stats = { mean: tf.keep(mean), variance: tf.keep(variance) };
    // Saved for the backward: x itself (alive anyway, as the convolution's output) and the
    // output (alive anyway, as the next layer's input), not xhat: the gradient tape keeps
    // every saved tensor until the backward pass ends, so recomputing xhat there halves the
    // full-size tensors a conv + BatchNorm + ReLU unit holds (4 -> 2).
    save([xv, yv, mean, invStd, gammaIn]);
    return {
      value: yv.reshape(shape) as T,
      // tf.customGrad calls gradFunc outside any tidy, so its temporaries would live until the
      // whole backward pass ends: the tidy frees them as soon as dx, dgamma and dbeta exist.
      gradFunc: (dy: tf.Tensor, saved: tf.Tensor[]) =>
        tf.tidy(() => {
          const [sx, sy, sMean, sInvStd, sGamma] = saved as [
            tf.Tensor2D,
            tf.Tensor2D,
            tf.Tensor1D,
            tf.Tensor1D,
            tf.Tensor1D,
          ];
          const sxhat = tf.mul(tf.sub(sx, rowOf(view, sMean)), rowOf(view, sInvStd)) as tf.Tensor2D;
          const dyRaw = dy.reshape([view.rows, view.repeat * view.channels]) as tf.Tensor2D;
          // ReLU's gradient: pass dy where the output is positive.
          const dyv = relu ? tf.mul(dyRaw, tf.step(sy)) as tf.Tensor2D : dyRaw;
          // Means rather than sums: dbeta/N and dgamma/N are what dx needs.
          const dbetaMean = channelMean(view, dyv);
          const dgammaMean = channelMean(view, tf.mul(dyv, sxhat));
          // Synchronised, dx needs the means over the global batch; dgamma and dbeta stay this rank's.
          const [dxBetaMean, dxGammaMean] = world === undefined
            ? [dbetaMean, dgammaMean]
            : globalGradientMeans(world, dbetaMean, dgammaMean, count, globalCount);
          const a = tf.mul(sGamma, sInvStd); // gamma·invstd
          const xhatCoef = tf.mul(a, tf.neg(dxGammaMean)); // −gamma·invstd·dgamma/N
          const shift = tf.mul(a, tf.neg(dxBetaMean)); // −gamma·invstd·dbeta/N
          const dx = tf.add(
            tf.add(tf.mul(dyv, rowOf(view, a)), tf.mul(sxhat, rowOf(view, xhatCoef))),
            rowOf(view, shift),
          ).reshape(shape);
          return [dx, tf.mul(dgammaMean, count), tf.mul(dbetaMean, count)];
        }),
    };
  });
  const y = op(x, gamma, beta) as T;
  return { y, ...intoCallerScope(stats!), count: globalCount };
};

/** Means of dy and dy·x̂ over the global batch from this rank's means over `count` values. */
const globalGradientMeans = (
  world: Communicator,
  dbetaMean: tf.Tensor1D,
  dgammaMean: tf.Tensor1D,
  count: number,
  globalCount: number,
): [tf.Tensor1D, tf.Tensor1D] => {
  const channels = dbetaMean.size;
  const sums = globalGradientSums(
    world,
    Float64Array.from(dbetaMean.dataSync(), (m) => m * count),
    Float64Array.from(dgammaMean.dataSync(), (m) => m * count),
  );
  const means = Float32Array.from(sums, (s) => s / globalCount);
  return [tf.tensor1d(means.subarray(0, channels)), tf.tensor1d(means.subarray(channels))];
};

/**
 * The same op through oneDNN's batch-normalisation primitives (backend/batch_norm_kernels.ts):
 * one kernel forward (statistics, normalisation, ReLU) and one backward. The forward
 * saves x, the statistics and, with ReLU, oneDNN's bit mask of the positive outputs.
 * Synchronised (`world` given), a first forward gives this rank's moments, which are
 * combined over the ranks, and a second normalises with the global ones; the backward
 * kernel all-reduces the gradient sums (its `globalCount`).
 */
const nativeBatchNormTrain = <T extends tf.Tensor>(
  x: T,
  gamma: tf.Tensor1D,
  beta: tf.Tensor1D,
  epsilon: number,
  relu: boolean,
  world: Communicator | undefined,
  count: number,
): BatchNormTrainOutput<T> => {
  const attrs = { epsilon, relu } as unknown as tf.NamedAttrMap;
  let globalCount = count;
  let stats: { mean: tf.Tensor1D; variance: tf.Tensor1D } | undefined;
  const op = tf.customGrad((...args: (tf.Tensor | tf.GradSaveFunc)[]) => {
    const [xIn, gammaIn, betaIn] = args as [tf.Tensor, tf.Tensor1D, tf.Tensor1D];
    const save = args[3] as tf.GradSaveFunc;
    const inputs = { x: xIn, gamma: gammaIn, beta: betaIn };
    let [y, mean, variance, workspace] = tf.engine().runKernel(
      BATCH_NORM_TRAIN,
      inputs,
      attrs,
    ) as tf.Tensor[];
    if (world !== undefined) {
      const global = combineMoments(world, mean!.dataSync(), variance!.dataSync(), count);
      tf.dispose([y!, mean!, variance!, ...(workspace === undefined ? [] : [workspace])]);
      globalCount = global.count;
      mean = tf.tensor1d(Float32Array.from(global.mean));
      variance = tf.tensor1d(Float32Array.from(global.variance));
      [y, workspace] = tf.engine().runKernel(
        BATCH_NORM_TRAIN,
        { ...inputs, mean, variance },
        attrs,
      ) as tf.Tensor[];
    }
    stats = { mean: tf.keep(mean as tf.Tensor1D), variance: tf.keep(variance as tf.Tensor1D) };
    const saved = [xIn, mean!, variance!, gammaIn, betaIn];
    save(workspace === undefined ? saved : [...saved, workspace]);
    const gradAttrs = world === undefined
      ? attrs
      : { epsilon, relu, globalCount } as unknown as tf.NamedAttrMap;
    return {
      value: y as T,
      gradFunc: (dy: tf.Tensor, saved: tf.Tensor[]) => {
        const [sx, sMean, sVariance, sGamma, sBeta, sWorkspace] = saved;
        const inputs: tf.NamedTensorMap = {
          x: sx!,
          mean: sMean!,
          variance: sVariance!,
          gamma: sGamma!,
          beta: sBeta!,
          dy,
        };
        if (sWorkspace !== undefined) inputs.workspace = sWorkspace;
        return tf.engine().runKernel(BATCH_NORM_TRAIN_GRAD, inputs, gradAttrs) as tf.Tensor[];
      },
    };
  });
  const y = op(x, gamma, beta) as T;
  return { y, ...intoCallerScope(stats!), count: globalCount };
};
