/**
 * Pieces shared by the image-level evaluations (`linear_eval.ts`, `semisup.ts`): a loader over a
 * source (or a subset of it) that hands each batch to a synchronous tensor step, SGD with
 * momentum as torch's, softmax cross-entropy, and top-1/top-5 scoring of logits.
 */
import * as tf from "@tensorflow/tfjs";
import { Effect, Stream } from "effect";
import { TRAIN_CROP_RATIO, TRAIN_CROP_SCALE, type TrainCropOptions } from "../data/eval_augment.ts";
import { type Batch, type Loader, makeLoader, type PrepareRef, stackView } from "../data/loader.ts";
import type { DataSource } from "../data/sources.ts";
import { evalPrepare } from "../stages/multicrop.ts";

/** The image side, channels and normalisation every evaluation transform shares. */
export interface EvalInput {
  readonly size: number;
  readonly channels: 1 | 3;
  readonly mean: readonly number[];
  readonly std: readonly number[];
  /** Shorter side before the test-time centre crop (undefined: no resize beyond the crop's). */
  readonly resize: number | undefined;
}

/** What an image-level evaluation run reads and reports, beside its own hyper-parameters. */
export interface EvalRunSettings<Epoch> {
  readonly input: EvalInput;
  readonly workers: number;
  readonly onError: "skip" | "fail";
  readonly onEpoch?: ((report: Epoch, epochs: number) => void) | undefined;
  readonly onProgress?: ((phase: string, done: number, total: number) => void) | undefined;
}

/** The train-time transform of eval_linear.py / eval_semisup.py, as a loader prepare. */
export const trainCropPrepare = (input: EvalInput): PrepareRef<TrainCropOptions> => ({
  module: new URL("../data/eval_augment.ts", import.meta.url).href,
  name: "trainCrop",
  config: {
    size: input.size,
    channels: input.channels,
    mean: [...input.mean],
    std: [...input.std],
    scale: TRAIN_CROP_SCALE,
    ratio: TRAIN_CROP_RATIO,
    flipProbability: 0.5,
  },
});

/** The test-time transform: Resize(resize) + CenterCrop(size) + Normalize. */
export const testPrepare = (input: EvalInput) =>
  evalPrepare({
    size: input.size,
    channels: input.channels,
    mean: [...input.mean],
    std: [...input.std],
    ...(input.resize === undefined ? {} : { resize: input.resize }),
  });

/** The samples `indices` of `source`, as a source of their own (index i is `source`'s `indices[i]`). */
export const subsetSource = (source: DataSource, indices: readonly number[]): DataSource => ({
  kind: source.kind,
  path: source.path,
  split: source.split,
  length: indices.length,
  ...(source.classes === undefined ? {} : { classes: source.classes }),
  channels: source.channels,
  fetch: (index) => source.fetch(indices[index]!),
  read: (index) => source.read(indices[index]!),
});

export interface BatchLoaderOptions {
  readonly source: DataSource;
  readonly prepare: PrepareRef;
  readonly seed: number;
  readonly batchSize: number;
  readonly shuffle: boolean;
  readonly workers: number;
  readonly onError: "skip" | "fail";
}

/** A loader kept for the whole evaluation (its workers start once). */
export const batchLoader = (options: BatchLoaderOptions) =>
  makeLoader({
    source: options.source,
    prepare: options.prepare,
    seed: options.seed,
    batchSize: options.batchSize,
    // DataLoader's default (drop_last false): every sample is seen each epoch.
    dropLast: false,
    shuffle: options.shuffle,
    workers: options.workers,
    onError: options.onError,
  });

/**
 * Runs `step` on every batch of `epoch` as an NHWC tensor (disposed after the step) with its
 * labels; `onBatch` gets the samples done so far.
 */
export const forEachBatch = (
  loader: Loader,
  epoch: number,
  size: number,
  channels: number,
  step: (x: tf.Tensor4D, labels: Int32Array, batch: Batch) => void,
  onBatch?: (done: number, total: number) => void,
) => {
  let done = 0;
  return loader.epoch(epoch).pipe(
    Stream.runForEach((batch) =>
      Effect.sync(() => {
        const n = batch.views.length;
        const x = tf.tensor4d(stackView(batch, 0), [n, size, size, channels]);
        try {
          step(x, batch.labels, batch);
        } finally {
          x.dispose();
        }
        done += n;
        onBatch?.(done, loader.source.length);
      })
    ),
  );
};

/** Mean softmax cross-entropy of logits [B, C] against integer labels (nn.CrossEntropyLoss). */
export const crossEntropy = (logits: tf.Tensor2D, labels: tf.Tensor1D, classes: number): tf.Scalar =>
  tf.tidy(() => {
    const target = tf.oneHot(labels, classes).toFloat();
    return tf.logSoftmax(logits).mul(target).sum().neg().div(logits.shape[0]) as tf.Scalar;
  });

/** torch.optim.SGD's hyper-parameters of one parameter group. */
export interface SgdSettings {
  readonly momentum: number;
  readonly weightDecay: number;
  readonly nesterov: boolean;
}

/**
 * torch.optim.SGD's step (dampening 0): d = g + wd·p; buf = momentum·buf + d
 * (buf starts at 0, so the first step's buf is d, as torch sets it);
 * p -= lr·(nesterov ? d + momentum·buf : buf).
 */
export const sgdUpdate = (
  param: tf.Variable,
  momentum: tf.Variable,
  grad: tf.Tensor,
  lr: number,
  options: SgdSettings,
): void =>
  tf.tidy(() => {
    const d = options.weightDecay === 0 ? grad : grad.add(param.mul(options.weightDecay));
    const buf = momentum.mul(options.momentum).add(d);
    momentum.assign(buf);
    const step = options.nesterov ? d.add(buf.mul(options.momentum)) : buf;
    param.assign(param.sub(step.mul(lr)));
  });

/** Running top-1/top-5 counts and the confusion matrix of scored batches. */
export class Scoreboard {
  correct1 = 0;
  correct5 = 0;
  count = 0;
  readonly confusion: number[][];
  constructor(readonly classes: number) {
    this.confusion = Array.from({ length: classes }, () => new Array<number>(classes).fill(0));
  }

  /** Adds a batch's top-k indices (row-major [rows, width]) against its labels. */
  add(top: Int32Array, width: number, labels: Int32Array): void {
    for (let r = 0; r < labels.length; r++) {
      const truth = labels[r]!;
      const ranked = top.subarray(r * width, (r + 1) * width);
      this.confusion[truth]![ranked[0]!]! += 1;
      if (ranked[0] === truth) this.correct1++;
      if (ranked.includes(truth)) this.correct5++;
    }
    this.count += labels.length;
  }

  result() {
    const perClassAccuracy = this.confusion.map((row, c) => {
      const total = row.reduce((a, b) => a + b, 0);
      return total === 0 ? Number.NaN : row[c]! / total;
    });
    return {
      top1: this.count === 0 ? 0 : this.correct1 / this.count,
      top5: this.count === 0 ? 0 : this.correct5 / this.count,
      confusion: this.confusion,
      perClassAccuracy,
    };
  }
}

/** The top-min(5, C) class indices of each row of `logits` (disposes nothing it did not make). */
export const topClasses = (logits: tf.Tensor2D, classes: number): tf.Tensor2D =>
  tf.topk(logits, Math.min(5, classes)).indices as tf.Tensor2D;
