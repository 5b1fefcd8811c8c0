/**
 * Linear evaluation as SwAV's `eval_linear.py` runs it (`--protocol paper`): the classifier is
 * trained on images, through the frozen backbone, with a fresh augmentation every epoch.
 *
 *   train source ─RandomResizedCrop(size) + flip─▶ backbone (eval mode: running BN statistics,
 *       no gradient) ─▶ feature map ─▶ RegLog (pooling [+ BN] + linear) ─▶ cross-entropy ─▶ SGD
 *   test source ─Resize + CenterCrop─▶ backbone (eval) ─▶ pooled map, once (the backbone is frozen
 *       and the transform deterministic) ─▶ RegLog (eval) ─▶ top-1 / top-5 after every epoch
 *
 * Defaults are the script's: batch 256 (32 per GPU x 8), SGD momentum 0.9 without Nesterov,
 * lr 0.3, weight decay 1e-6 on every classifier parameter, `CosineAnnealingLR(T_max = epochs,
 * eta_min = 0)` stepped once per epoch, 100 epochs; the best epoch's top-1 is the reported number.
 * `RegLog` defaults to global average pooling without BatchNorm; the variant pools the last
 * feature map with AvgPool2d(k, stride 1) to 2x2 (k = 6 on ResNet-50's 7x7 map, k = side - 1 in
 * general) and may add BatchNorm2d, as the reference's `--global_pooling false [--use_bn true]`.
 *
 * Layout: the variant's flattened features are NHWC ((i, j, c), c fastest), where torch's
 * `view(N, -1)` of NCHW is (c, i, j); the classifier's weight is [D, C] in that order.
 */
import * as tf from "@tensorflow/tfjs";
import { Effect, type Scope } from "effect";
import type { DecodeError } from "../data/image_codec.ts";
import type { LoaderError } from "../data/loader.ts";
import type { DataSource } from "../data/sources.ts";
import type { SwavModel } from "../models/model.ts";
import { backboneFeatureMap, batchNorm, type ParamLookup } from "../models/resnet.ts";
import {
  batchLoader,
  crossEntropy,
  type EvalRunSettings,
  forEachBatch,
  Scoreboard,
  sgdUpdate,
  testPrepare,
  topClasses,
  trainCropPrepare,
} from "./eval_loop.ts";
import { EvaluationInputError } from "./knn.ts";
import { initialProbeWeights, type ProbeEpoch, probeLearningRate } from "./linear_probe.ts";

/** RegLog's pooling before the linear layer: global average pooling, or eval_linear.py's AvgPool2d variant (`avgpool`: kernel side - 1, 6 on a 7 x 7 map, giving 2 x 2). */
export type Pooling = "global" | "avgpool";

export interface LinearEvalOptions extends EvalRunSettings<ProbeEpoch> {
  readonly numClasses: number;
  readonly epochs: number;
  readonly batchSize: number;
  readonly lr: number;
  readonly finalLr: number;
  readonly momentum: number;
  readonly weightDecay: number;
  readonly nesterov: boolean;
  /** Keys the classifier's initial weights and every epoch's shuffle and crops. */
  readonly seed: number;
  readonly pooling: Pooling;
  /** BatchNorm2d before the linear layer (only with `avgpool`, as the reference's RegLog). */
  readonly batchNorm: boolean;
}

/** eval_linear.py's defaults. */
export const linearEvalDefaults = {
  epochs: 100,
  batchSize: 256,
  lr: 0.3,
  finalLr: 0,
  momentum: 0.9,
  weightDecay: 1e-6,
  nesterov: false,
  seed: 31,
  pooling: "global" as Pooling,
  batchNorm: false,
} as const;

/** RegLog's parameters and momentum buffers. */
export interface RegLog extends Disposable {
  readonly pooling: Pooling;
  /** AvgPool2d's kernel (variant only). */
  readonly kernel: number;
  /** [D, C]. */
  readonly weight: tf.Variable;
  readonly bias: tf.Variable;
  /** `bn.weight`, `bn.bias`, `bn.running_mean`, `bn.running_var` when BatchNorm is on. */
  readonly bn: ReadonlyMap<string, tf.Variable> | undefined;
  readonly trainable: readonly tf.Variable[];
  readonly momentum: readonly tf.Variable[];
}

/** Why the variant cannot pool a map of side `side`, or undefined. */
export const poolingProblem = (pooling: Pooling, side: number, size: number): string | undefined =>
  pooling === "avgpool" && side < 2
    ? `--pooling avgpool needs a feature map of at least 2x2; this backbone gives ${side}x${side} at crop size ${size}: use --pooling global`
    : undefined;

/** The variant's AvgPool2d kernel: 6 on a 7x7 map (the reference), side - 1 in general (a 2x2 output). */
export const avgPoolKernel = (side: number): number => side - 1;

/**
 * A RegLog for features of `channels` channels on a `side` x `side` map: weight N(0, 0.01²)
 * (seeded), bias 0, BatchNorm weight 1, bias 0, running mean 0, var 1 (torch's inits).
 */
export const makeRegLog = (
  channels: number,
  side: number,
  classes: number,
  options: {
    pooling: Pooling;
    batchNorm: boolean;
    seed: number;
    init?: { weight: Float32Array; bias: Float32Array };
  },
): RegLog => {
  const kernel = options.pooling === "avgpool" ? avgPoolKernel(side) : side;
  const out = side - kernel + 1;
  const dim = options.pooling === "avgpool" ? out * out * channels : channels;
  const init = options.init ?? initialProbeWeights(dim, classes, options.seed);
  // In tidies: tf.variable keeps its initial tensor alive otherwise.
  const variable = (make: () => tf.Tensor, trainable = true) => tf.tidy(() => tf.variable(make(), trainable));
  const weight = variable(() => tf.tensor2d(init.weight, [dim, classes]));
  const bias = variable(() => tf.tensor1d(init.bias));
  const bn = options.batchNorm
    ? new Map([
      ["bn.weight", variable(() => tf.ones([channels]))],
      ["bn.bias", variable(() => tf.zeros([channels]))],
      ["bn.running_mean", variable(() => tf.zeros([channels]), false)],
      ["bn.running_var", variable(() => tf.ones([channels]), false)],
    ])
    : undefined;
  const trainable = [weight, bias, ...(bn === undefined ? [] : [bn.get("bn.weight")!, bn.get("bn.bias")!])];
  const momentum = trainable.map((v) => variable(() => tf.zerosLike(v)));
  return {
    pooling: options.pooling,
    kernel,
    weight,
    bias,
    bn,
    trainable,
    momentum,
    [Symbol.dispose]: () => tf.dispose([...trainable, ...momentum, ...(bn === undefined ? [] : bn.values())]),
  };
};

/** RegLog's pooling: global mean [N, F], or AvgPool2d(kernel, 1) [N, out, out, F]. */
export const regLogPool = (head: RegLog, map: tf.Tensor4D): tf.Tensor =>
  tf.tidy(() => head.pooling === "global" ? tf.mean(map, [1, 2]) : tf.avgPool(map, head.kernel, 1, "valid"));

/** RegLog after pooling: [BatchNorm2d,] flatten, linear; logits [N, C]. */
export const regLogLogits = (head: RegLog, pooled: tf.Tensor, training: boolean): tf.Tensor2D =>
  tf.tidy(() => {
    let x = pooled;
    if (head.bn !== undefined) {
      const lookup: ParamLookup = (name) => head.bn!.get(name)!;
      x = batchNorm(lookup, "bn", x, { training });
    }
    return x.reshape([x.shape[0]!, -1]).matMul(head.weight).add(head.bias) as tf.Tensor2D;
  });

/**
 * One SGD step of RegLog on a batch of frozen feature maps (train mode: BatchNorm's batch
 * statistics, running ones updated); returns the batch's summed loss (caller disposes).
 */
export const regLogStep = (
  head: RegLog,
  map: tf.Tensor4D,
  labels: Int32Array,
  classes: number,
  lr: number,
  sgd: { momentum: number; weightDecay: number; nesterov: boolean },
): tf.Scalar =>
  tf.tidy(() => {
    const pooled = regLogPool(head, map);
    const target = tf.tensor1d(labels, "int32");
    const { value, grads } = tf.variableGrads(
      () => crossEntropy(regLogLogits(head, pooled, true), target as tf.Tensor1D, classes),
      [...head.trainable],
    );
    head.trainable.forEach((v, i) => sgdUpdate(v, head.momentum[i]!, grads[v.name]!, lr, sgd));
    return value.mul(labels.length) as tf.Scalar;
  });

/** What RegLog is trained on: a frozen map of `channels` channels per position, computed from a batch. */
export interface FrozenFeatures {
  readonly channels: number;
  /** The batch's feature map [N, side, side, channels] (a new tensor the caller disposes). */
  readonly map: (x: tf.Tensor4D) => tf.Tensor4D;
}

/** The frozen backbone's feature map (eval mode: running BN statistics, no gradient). */
export const backboneFeatures = (model: SwavModel): FrozenFeatures => ({
  channels: model.plan.featureDim,
  map: (x) => backboneFeatureMap(model.plan, model.param, x, { training: false }),
});

/**
 * The input pixels themselves as one 1x1 "map" of side x side x channels values: a linear
 * classifier on raw pixels under the same protocol, the baseline a learnt feature must beat.
 */
export const rawPixelFeatures = (size: number, channels: number): FrozenFeatures => ({
  channels: size * size * channels,
  map: (x) => x.reshape([x.shape[0], 1, 1, size * size * channels]),
});

/**
 * How a classifier trained on images (`linearEvaluation`, `semisupEvaluation`) fails: settings it cannot run
 * with (EvaluationInputError), or a source whose images cannot be read (LoaderError, DecodeError).
 */
export type ImageEvaluationError = EvaluationInputError | LoaderError | DecodeError;

/** Accuracies of a classifier trained on images (linear paper protocol, semisup), best and last epoch. */
export interface ImageEvaluation {
  /** Best epoch's top-1 and its top-5, as the reference reports. */
  readonly top1: number;
  /** Top-5 accuracy, a fraction in [0, 1]. */
  readonly top5: number;
  /** The epoch (1-based) whose top-1 is reported. */
  readonly bestEpoch: number;
  /** The last epoch's top-1. */
  readonly lastTop1: number;
  /** The last epoch's top-5. */
  readonly lastTop5: number;
  /** Top-1 accuracy of each class. */
  readonly perClassAccuracy: number[];
  /** confusion[truth][predicted] counts over the test set. */
  readonly confusion: number[][];
  /** Every epoch's learning rate, loss and accuracies. */
  readonly history: readonly ProbeEpoch[];
}

const labelProblem = (labels: Int32Array, classes: number): string | undefined => {
  const outside = labels.find((label) => !(label >= 0 && label < classes));
  return outside === undefined
    ? undefined
    : `label ${outside} is outside 0..${classes - 1} (unlabelled data?)`;
};

/** Keeps the best (by top-1) and last epoch's scores and the history. */
export class EpochTracker {
  readonly history: ProbeEpoch[] = [];
  best: (ReturnType<Scoreboard["result"]> & { epoch: number }) | undefined;
  last: ReturnType<Scoreboard["result"]> | undefined;

  record(epoch: number, lr: number, loss: number, scores: ReturnType<Scoreboard["result"]>): ProbeEpoch {
    this.last = scores;
    if (this.best === undefined || scores.top1 > this.best.top1) this.best = { ...scores, epoch: epoch + 1 };
    const report = { epoch: epoch + 1, lr, loss, top1: scores.top1, top5: scores.top5 };
    this.history.push(report);
    return report;
  }

  result(): ImageEvaluation {
    const best = this.best!;
    const last = this.last!;
    return {
      top1: best.top1,
      top5: best.top5,
      bestEpoch: best.epoch,
      lastTop1: last.top1,
      lastTop5: last.top5,
      perClassAccuracy: best.perClassAccuracy,
      confusion: best.confusion,
      history: this.history,
    };
  }
}

/** eval_linear.py end to end on a loaded, frozen model (the model is read, never changed). */
export const linearEvaluation = (
  model: SwavModel,
  train: DataSource,
  test: DataSource,
  options: LinearEvalOptions,
): Effect.Effect<ImageEvaluation, ImageEvaluationError, Scope.Scope> =>
  linearEvaluationOn(backboneFeatures(model), train, test, options);

/** eval_linear.py end to end on any frozen features (a backbone, or raw pixels as the baseline). */
export const linearEvaluationOn = (
  features: FrozenFeatures,
  train: DataSource,
  test: DataSource,
  options: LinearEvalOptions,
): Effect.Effect<ImageEvaluation, ImageEvaluationError, Scope.Scope> =>
  Effect.gen(function* () {
    const { input, numClasses: classes } = options;
    if (!(options.epochs >= 1)) {
      return yield* new EvaluationInputError({ message: "epochs must be at least 1" });
    }
    if (options.batchNorm && options.pooling === "global") {
      return yield* new EvaluationInputError({
        message:
          "--bn applies to --pooling avgpool (the reference's RegLog has no BatchNorm with global pooling)",
      });
    }
    const side = yield* Effect.sync(() => {
      const probe = tf.zeros([1, input.size, input.size, input.channels]) as tf.Tensor4D;
      const map = features.map(probe);
      probe.dispose();
      const s = map.shape[1];
      map.dispose();
      return s;
    });
    const problem = poolingProblem(options.pooling, side, input.size);
    if (problem !== undefined) return yield* new EvaluationInputError({ message: problem });
    const head = yield* Effect.acquireRelease(
      Effect.sync(() =>
        makeRegLog(features.channels, side, classes, {
          pooling: options.pooling,
          batchNorm: options.batchNorm,
          seed: options.seed,
        })
      ),
      (h) => Effect.sync(() => h[Symbol.dispose]()),
    );
    const common = { seed: options.seed, workers: options.workers, onError: options.onError };
    const trainLoader = yield* batchLoader({
      ...common,
      source: train,
      prepare: trainCropPrepare(input),
      batchSize: options.batchSize,
      shuffle: true,
    });
    const testLoader = yield* batchLoader({
      ...common,
      source: test,
      prepare: testPrepare(input),
      batchSize: options.batchSize,
      shuffle: false,
    });
    // The test set's pooled maps, once: the backbone is frozen and the transform deterministic.
    const testParts: tf.Tensor[] = [];
    const testLabels: Int32Array[] = [];
    yield* Effect.addFinalizer(() => Effect.sync(() => tf.dispose(testParts)));
    let badLabel: string | undefined;
    yield* forEachBatch(testLoader, 0, input.size, input.channels, (x, labels) => {
      badLabel ??= labelProblem(labels, classes);
      testParts.push(tf.tidy(() => regLogPool(head, features.map(x))));
      testLabels.push(labels);
    }, (done, total) => options.onProgress?.("test features", done, total));
    if (badLabel !== undefined) {
      return yield* new EvaluationInputError({ message: `test source: ${badLabel}` });
    }
    const tracker = new EpochTracker();
    const sgd = { momentum: options.momentum, weightDecay: options.weightDecay, nesterov: options.nesterov };
    for (let epoch = 0; epoch < options.epochs; epoch++) {
      const lr = probeLearningRate(epoch, options);
      const lossParts: tf.Scalar[] = [];
      let seen = 0;
      yield* forEachBatch(trainLoader, epoch, input.size, input.channels, (x, labels) => {
        badLabel ??= labelProblem(labels, classes);
        if (badLabel !== undefined) return;
        const map = features.map(x);
        try {
          lossParts.push(regLogStep(head, map, labels, classes, lr, sgd));
        } finally {
          map.dispose();
        }
        seen += labels.length;
      }, (done, total) => options.onProgress?.(`linear eval epoch ${epoch + 1}`, done, total));
      if (badLabel !== undefined) {
        tf.dispose(lossParts);
        return yield* new EvaluationInputError({ message: `train source: ${badLabel}` });
      }
      const lossTotal = tf.tidy(() => lossParts.length === 0 ? tf.scalar(0) : tf.addN(lossParts));
      const loss = (yield* Effect.promise(() => lossTotal.data()))[0]! / Math.max(1, seen);
      tf.dispose([lossTotal, ...lossParts]);
      const board = new Scoreboard(classes);
      for (let i = 0; i < testParts.length; i++) {
        const top = tf.tidy(() => topClasses(regLogLogits(head, testParts[i]!, false), classes));
        const ranked = (yield* Effect.promise(() => top.data())) as Int32Array;
        top.dispose();
        board.add(ranked, Math.min(5, classes), testLabels[i]!);
      }
      const report = tracker.record(epoch, lr, loss, board.result());
      options.onEpoch?.(report, options.epochs);
    }
    return tracker.result();
  });
