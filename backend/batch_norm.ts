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
 * - channel sums are ones[1, rows] · view[rows, L·C] (a matrix product, XNNPACK),
 *   then a small [L, C] sum, instead of Sum over axes (0, 1, 2), which
 *   transposes the whole tensor first.
 */
import * as tf from "@tensorflow/tfjs";

/** Broadcast rows shorter than this are slow in tfjs-backend-wasm's binary ops. */
const MIN_ROW = 256;

/** The [rows, L·C] view of x [..., C] used by every per-channel operation. */
interface ChannelView {
  readonly rows: number;
  /** How many channel vectors make one row. */
  readonly repeat: number;
  readonly channels: number;
}

const channelView = (shape: readonly number[]): ChannelView => {
  const channels = shape[shape.length - 1]!;
  const count = shape.reduce((a, b) => a * b, 1) / channels;
  let repeat = count;
  for (let l = Math.max(1, Math.ceil(MIN_ROW / channels)); l <= count; l++) {
    if (count % l === 0) {
      repeat = l;
      break;
    }
  }
  return { rows: count / repeat, repeat, channels };
};

/** v [C] repeated to the view's row [L·C]. */
const rowOf = (view: ChannelView, v: tf.Tensor): tf.Tensor1D =>
  (view.repeat === 1 ? v : tf.tile(v, [view.repeat])) as tf.Tensor1D;

/** Σ over all but the channel axis of a view [rows, L·C]: [C]. */
const channelSum = (view: ChannelView, t: tf.Tensor2D): tf.Tensor1D => {
  const partial = tf.matMul(tf.ones([1, view.rows]), t); // [1, L·C]
  return (view.repeat === 1 ? partial.reshape([view.channels]) : tf.sum(
    partial.reshape([view.repeat, view.channels]),
    0,
  )) as tf.Tensor1D;
};

/** What `batchNormTrain` returns. */
export interface BatchNormTrainOutput<T extends tf.Tensor> {
  /** gamma·(x − mean)/√(var + eps) + beta; gradients flow to x, gamma, beta. */
  readonly y: T;
  /** Batch mean per channel [C] (carries no gradient; for running statistics). */
  readonly mean: tf.Tensor1D;
  /** Biased batch variance per channel [C] (carries no gradient; for running statistics). */
  readonly variance: tf.Tensor1D;
}

/**
 * BatchNorm over all axes but the last of x ([N, H, W, C], [N, C], ...) with
 * this batch's statistics, as torch's train mode normalises. All three outputs
 * belong to the caller's scope (a tf.tidy disposes them as usual).
 */
export const batchNormTrain = <T extends tf.Tensor>(
  x: T,
  gamma: tf.Tensor1D,
  beta: tf.Tensor1D,
  epsilon: number,
): BatchNormTrainOutput<T> => {
  const shape = x.shape;
  const view = channelView(shape);
  const count = view.rows * view.repeat;
  if (gamma.size !== view.channels || beta.size !== view.channels) {
    throw new Error(`batchNormTrain: gamma/beta of size ${gamma.size}/${beta.size} for input [${shape}]`);
  }
  // The statistics leave the custom gradient's forward (which runs in its own
  // tidy, off the tape) kept; they are cloned into the caller's scope below.
  let stats: { mean: tf.Tensor1D; variance: tf.Tensor1D } | undefined;
  const op = tf.customGrad((...args: (tf.Tensor | tf.GradSaveFunc)[]) => {
    const [xIn, gammaIn, betaIn] = args as [tf.Tensor, tf.Tensor1D, tf.Tensor1D];
    const save = args[3] as tf.GradSaveFunc;
    const xv = xIn.reshape([view.rows, view.repeat * view.channels]) as tf.Tensor2D;
    const mean = tf.div(channelSum(view, xv), count) as tf.Tensor1D;
    const centred = tf.sub(xv, rowOf(view, mean)) as tf.Tensor2D;
    const variance = tf.div(channelSum(view, tf.mul(centred, centred) as tf.Tensor2D), count) as tf.Tensor1D;
    const invStd = tf.rsqrt(tf.add(variance, epsilon)) as tf.Tensor1D;
    const xhat = tf.mul(centred, rowOf(view, invStd)) as tf.Tensor2D;
    const y = tf.add(tf.mul(xhat, rowOf(view, gammaIn)), rowOf(view, betaIn)).reshape(shape);
    stats = { mean: tf.keep(mean), variance: tf.keep(variance) };
    save([xhat, invStd, gammaIn]);
    return {
      value: y as T,
      gradFunc: (dy: tf.Tensor, saved: tf.Tensor[]) => {
        const [sxhat, sInvStd, sGamma] = saved as [tf.Tensor2D, tf.Tensor1D, tf.Tensor1D];
        const dyv = dy.reshape([view.rows, view.repeat * view.channels]) as tf.Tensor2D;
        const dbeta = channelSum(view, dyv);
        const dgamma = channelSum(view, tf.mul(dyv, sxhat) as tf.Tensor2D);
        const a = tf.mul(sGamma, sInvStd); // gamma·invstd
        const xhatCoef = tf.mul(a, tf.div(dgamma, -count)); // −gamma·invstd·dgamma/N
        const shift = tf.mul(a, tf.div(dbeta, -count)); // −gamma·invstd·dbeta/N
        const dx = tf.add(
          tf.add(tf.mul(dyv, rowOf(view, a)), tf.mul(sxhat, rowOf(view, xhatCoef))),
          rowOf(view, shift),
        ).reshape(shape);
        return [dx, dgamma, dbeta];
      },
    };
  });
  const y = op(x, gamma, beta) as T;
  const kept = stats!;
  const mean = tf.clone(kept.mean);
  const variance = tf.clone(kept.variance);
  kept.mean.dispose();
  kept.variance.dispose();
  return { y, mean, variance };
};
