/**
 * Linear probe on frozen features, as SwAV's `eval_linear.py` with its
 * defaults: one linear layer (`RegLog` with global pooling and no BatchNorm:
 * weight ~ N(0, 0.01²), bias 0) on the pooled backbone features, softmax
 * cross-entropy, SGD (momentum 0.9, weight decay 1e-6 on weight and bias,
 * nesterov off), lr 0.3 annealed by `CosineAnnealingLR(T_max = epochs,
 * eta_min = 0)` once per epoch, 100 epochs, batch 256 (32 per GPU x 8),
 * partial last batch kept; the test set is scored after every epoch and the
 * best top-1 is the reported number.
 *
 * This is the fast mode: the features are computed once (centre crops, no
 * RandomResizedCrop/flip per epoch as the reference does on images), so an
 * epoch is a few matrix products on an [N, D] bank and 100 epochs are cheap.
 *
 * The gradient of the mean cross-entropy of a linear layer is closed-form,
 * dL/dlogits = (softmax - onehot) / B, so no gradient tape is needed.
 */
import * as tf from "@tensorflow/tfjs";
import { Effect } from "effect";
import { epochOrder } from "../data/loader.ts";
import { rngFor } from "../data/rng.ts";
import { EvaluationInputError } from "./knn.ts";

/** The linear probe's training settings (`linearProbeDefaults` holds the reference's). */
export interface LinearProbeOptions {
  /** Number of classes (labels are 0 .. numClasses - 1). */
  readonly numClasses: number;
  /** Epochs over the training features (100 in the reference). */
  readonly epochs: number;
  /** Training batch size (256). */
  readonly batchSize: number;
  /** Initial learning rate (0.3). */
  readonly lr: number;
  /** CosineAnnealingLR's eta_min (0). */
  readonly finalLr: number;
  /** SGD momentum (0.9). */
  readonly momentum: number;
  /** L2 weight decay added to the gradient, on weight and bias as torch's SGD does (1e-6). */
  readonly weightDecay: number;
  /** Nesterov momentum (false). */
  readonly nesterov: boolean;
  /** Keys the initial weights and the per-epoch shuffles. */
  readonly seed: number;
  /** Starting weights ([D, C] row-major, [C]) instead of the seeded N(0, 0.01²) draw. */
  readonly init?: { readonly weight: Float32Array; readonly bias: Float32Array };
  /** Test rows scored at once. */
  readonly chunkSize?: number;
  /** Called after each epoch with its report. */
  readonly onEpoch?: (report: ProbeEpoch, epochs: number) => void;
}

/** SwAV eval_linear.py defaults (batch 32 per GPU on 8 GPUs). */
export const linearProbeDefaults: Pick<
  LinearProbeOptions,
  "epochs" | "batchSize" | "lr" | "finalLr" | "momentum" | "weightDecay" | "nesterov" | "seed"
> = {
  epochs: 100,
  batchSize: 256,
  lr: 0.3,
  finalLr: 0,
  momentum: 0.9,
  weightDecay: 1e-6,
  nesterov: false,
  seed: 31,
} as const;

/** One epoch of a linear classifier's training: its learning rate, mean loss and test accuracies. */
export interface ProbeEpoch {
  /** 1-based. */
  readonly epoch: number;
  /** Learning rate during the epoch. */
  readonly lr: number;
  /** Mean training loss over the epoch's batches (weighted by batch size). */
  readonly loss: number;
  /** Test top-1 after the epoch. */
  readonly top1: number;
  /** Test top-5 after the epoch. */
  readonly top5: number;
}

export interface ClassifierScores {
  readonly top1: number;
  readonly top5: number;
  /** Predicted class per test row. */
  readonly predictions: Int32Array;
  /** confusion[truth][predicted] counts; row t sums to the number of test rows of class t. */
  readonly confusion: number[][];
  /** Correct / total per true class (NaN for a class absent from the test set). */
  readonly perClassAccuracy: number[];
}

/** The trained probe's accuracies (best and last epoch), history and weights. */
export interface LinearProbeResult {
  /** Best epoch's top-1 (the reference's reported number) and that epoch's top-5. */
  readonly top1: number;
  /** The best epoch's top-5. */
  readonly top5: number;
  /** The epoch (1-based) whose top-1 is reported. */
  readonly bestEpoch: number;
  /** The last epoch's top-1. */
  readonly lastTop1: number;
  /** The last epoch's top-5. */
  readonly lastTop5: number;
  /** Per-class accuracy and confusion matrix of the best epoch's classifier. */
  readonly perClassAccuracy: number[];
  /** confusion[truth][predicted] counts of the best epoch's classifier. */
  readonly confusion: number[][];
  /** Every epoch's learning rate, loss and accuracies. */
  readonly history: readonly ProbeEpoch[];
  /** The final weights [D, C], row-major. */
  readonly weight: Float32Array;
  /** The final bias [C]. */
  readonly bias: Float32Array;
}

/** CosineAnnealingLR's closed form at (0-based) `epoch`. */
export const probeLearningRate = (
  epoch: number,
  options: Pick<LinearProbeOptions, "lr" | "finalLr" | "epochs">,
) =>
  options.finalLr + (options.lr - options.finalLr) * (1 + Math.cos((Math.PI * epoch) / options.epochs)) / 2;

/** nn.Linear init as eval_linear.py overrides it: weight N(0, 0.01²), bias 0; seeded. */
export const initialProbeWeights = (dim: number, classes: number, seed: number) => {
  const rng = rngFor(seed, 0x11ea_0001);
  const weight = new Float32Array(dim * classes);
  for (let i = 0; i < weight.length; i += 2) {
    const radius = 0.01 * Math.sqrt(-2 * Math.log(1 - rng.next()));
    const angle = 2 * Math.PI * rng.next();
    weight[i] = radius * Math.cos(angle);
    if (i + 1 < weight.length) weight[i + 1] = radius * Math.sin(angle);
  }
  return { weight, bias: new Float32Array(classes) };
};

const labelsProblem = (
  labels: Int32Array,
  rows: number,
  classes: number,
  what: string,
): string | undefined => {
  if (labels.length !== rows) return `linear probe: ${labels.length} ${what} labels for ${rows} rows`;
  const outside = labels.find((label) => !(label >= 0 && label < classes));
  return outside === undefined
    ? undefined
    : `linear probe: ${what} label ${outside} is outside 0..${classes - 1} (unlabelled data?)`;
};

/** Why these features and labels cannot train a probe, or undefined. */
const probeInputProblem = (
  trainFeatures: tf.Tensor2D,
  trainLabels: Int32Array,
  testFeatures: tf.Tensor2D,
  testLabels: Int32Array,
  options: LinearProbeOptions,
): string | undefined => {
  const [n, dim] = trainFeatures.shape;
  if (testFeatures.shape[1] !== dim) {
    return `linear probe: test features have ${testFeatures.shape[1]} columns, train ${dim}`;
  }
  if (n === 0) return "linear probe: no training features";
  if (!(options.epochs >= 1)) return "linear probe: epochs must be at least 1";
  return labelsProblem(trainLabels, n, options.numClasses, "train") ??
    labelsProblem(testLabels, testFeatures.shape[0], options.numClasses, "test");
};

/** Scores a linear classifier on test features: top-1/top-5, predictions, confusion, per-class accuracy. */
export const scoreClassifier = async (
  weight: tf.Tensor2D,
  bias: tf.Tensor1D,
  features: tf.Tensor2D,
  labels: Int32Array,
  numClasses: number,
  chunkSize = 1024,
): Promise<ClassifierScores> => {
  const m = features.shape[0];
  const width = Math.min(5, numClasses);
  const predictions = new Int32Array(m);
  const confusion = Array.from({ length: numClasses }, () => new Array<number>(numClasses).fill(0));
  let correct1 = 0;
  let correct5 = 0;
  for (let start = 0; start < m; start += chunkSize) {
    const rows = Math.min(chunkSize, m - start);
    const order = tf.tidy(() => {
      const logits = features.slice([start, 0], [rows, -1]).matMul(weight).add(bias);
      return tf.topk(logits, width).indices;
    });
    const top = (await order.data()) as Int32Array;
    order.dispose();
    for (let r = 0; r < rows; r++) {
      const truth = labels[start + r]!;
      const ranked = top.subarray(r * width, (r + 1) * width);
      predictions[start + r] = ranked[0]!;
      confusion[truth]![ranked[0]!]! += 1;
      if (ranked[0] === truth) correct1++;
      if (ranked.includes(truth)) correct5++;
    }
  }
  const perClassAccuracy = confusion.map((row, c) => {
    const total = row.reduce((a, b) => a + b, 0);
    return total === 0 ? Number.NaN : row[c]! / total;
  });
  return { top1: correct1 / m, top5: correct5 / m, predictions, confusion, perClassAccuracy };
};

/**
 * Trains the probe on `trainFeatures` [N, D] and scores it on `testFeatures`
 * [M, D] after every epoch. The caller keeps ownership of the feature tensors.
 *
 * @example A probe on two separable classes of 2-d features
 * ```ts
 * import * as tf from "@tensorflow/tfjs";
 * import { Effect } from "effect";
 * import assert from "node:assert/strict";
 * import { initBackend, linearProbeDefaults, trainLinearProbe } from "@swav/swav-ts";
 *
 * await initBackend("cpu");
 * const features = tf.tensor2d([[1, 0], [0.9, 0.2], [0.8, -0.1], [0, 1], [0.1, 0.9], [-0.2, 0.8]]);
 * const labels = new Int32Array([0, 0, 0, 1, 1, 1]);
 * const result = await Effect.runPromise(
 *   trainLinearProbe(features, labels, features, labels, {
 *     ...linearProbeDefaults,
 *     numClasses: 2,
 *     epochs: 20,
 *     batchSize: 6,
 *     lr: 1,
 *   }),
 * );
 * assert.equal(result.top1, 1);
 * assert.equal(result.history.length, 20);
 * features.dispose();
 * ```
 */
export const trainLinearProbe = (
  trainFeatures: tf.Tensor2D,
  trainLabels: Int32Array,
  testFeatures: tf.Tensor2D,
  testLabels: Int32Array,
  options: LinearProbeOptions,
): Effect.Effect<LinearProbeResult, EvaluationInputError> => {
  const problem = probeInputProblem(trainFeatures, trainLabels, testFeatures, testLabels, options);
  if (problem !== undefined) return Effect.fail(new EvaluationInputError({ message: problem }));
  return Effect.promise(() => probeEpochs(trainFeatures, trainLabels, testFeatures, testLabels, options));
};

/** The probe's epochs, on inputs already checked to fit. */
const probeEpochs = async (
  trainFeatures: tf.Tensor2D,
  trainLabels: Int32Array,
  testFeatures: tf.Tensor2D,
  testLabels: Int32Array,
  options: LinearProbeOptions,
): Promise<LinearProbeResult> => {
  const [n, dim] = trainFeatures.shape;
  const classes = options.numClasses;
  const init = options.init ?? initialProbeWeights(dim, classes, options.seed);
  // In tidies: tf.variable keeps its initial tensor alive otherwise.
  const weight = tf.tidy(() => tf.variable(tf.tensor2d(init.weight, [dim, classes])));
  const bias = tf.tidy(() => tf.variable(tf.tensor1d(init.bias)));
  const weightMomentum = tf.tidy(() => tf.variable(tf.zeros([dim, classes])));
  const biasMomentum = tf.tidy(() => tf.variable(tf.zeros([classes])));
  const labelsOnDevice = tf.tensor1d(trainLabels, "int32");
  const history: ProbeEpoch[] = [];
  let best: (ClassifierScores & { epoch: number }) | undefined;
  let last: ClassifierScores | undefined;
  try {
    for (let epoch = 0; epoch < options.epochs; epoch++) {
      const lr = probeLearningRate(epoch, options);
      const order = Int32Array.from(epochOrder(n, options.seed, epoch));
      const lossParts: tf.Scalar[] = [];
      for (let start = 0; start < n; start += options.batchSize) {
        const rows = Math.min(options.batchSize, n - start);
        const loss = tf.tidy(() => {
          const index = tf.tensor1d(order.subarray(start, start + rows), "int32");
          const x = tf.gather(trainFeatures, index);
          const target = tf.oneHot(tf.gather(labelsOnDevice, index), classes).toFloat();
          const logits = x.matMul(weight).add(bias);
          const logProbabilities = tf.logSoftmax(logits);
          // Sum (not mean) of the batch's losses: the epoch mean is weighted by batch size.
          const lossSum = target.mul(logProbabilities).sum().neg();
          const dLogits = logProbabilities.exp().sub(target).div(rows);
          sgdUpdate(weight, weightMomentum, x.transpose().matMul(dLogits), lr, options);
          sgdUpdate(bias, biasMomentum, dLogits.sum(0), lr, options);
          return lossSum as tf.Scalar;
        });
        lossParts.push(loss);
      }
      const lossTotal = tf.tidy(() => tf.addN(lossParts));
      const loss = (await lossTotal.data())[0]! / n;
      tf.dispose([lossTotal, ...lossParts]);
      last = await scoreClassifier(weight, bias, testFeatures, testLabels, classes, options.chunkSize);
      if (best === undefined || last.top1 > best.top1) best = { ...last, epoch: epoch + 1 };
      const report = { epoch: epoch + 1, lr, loss, top1: last.top1, top5: last.top5 };
      history.push(report);
      options.onEpoch?.(report, options.epochs);
    }
    // epochs >= 1 was checked, so both are set.
    const top = best!;
    const final = last!;
    return {
      top1: top.top1,
      top5: top.top5,
      bestEpoch: top.epoch,
      lastTop1: final.top1,
      lastTop5: final.top5,
      perClassAccuracy: top.perClassAccuracy,
      confusion: top.confusion,
      history,
      weight: (await weight.data()) as Float32Array,
      bias: (await bias.data()) as Float32Array,
    };
  } finally {
    tf.dispose([weight, bias, weightMomentum, biasMomentum, labelsOnDevice]);
  }
};

/**
 * torch.optim.SGD's step (dampening 0): d = g + wd·p; buf = momentum·buf + d
 * (buf starts at 0, so the first step's buf is d, as torch sets it);
 * p -= lr·(nesterov ? d + momentum·buf : buf).
 */
const sgdUpdate = (
  param: tf.Variable,
  momentum: tf.Variable,
  grad: tf.Tensor,
  lr: number,
  options: Pick<LinearProbeOptions, "momentum" | "weightDecay" | "nesterov">,
) => {
  const d = options.weightDecay === 0 ? grad : grad.add(param.mul(options.weightDecay));
  const buf = momentum.mul(options.momentum).add(d);
  momentum.assign(buf);
  const step = options.nesterov ? d.add(buf.mul(options.momentum)) : buf;
  param.assign(param.sub(step.mul(lr)));
};
