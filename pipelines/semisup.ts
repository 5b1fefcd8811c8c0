/**
 * Semi-supervised fine-tuning as SwAV's `eval_semisup.py` runs it: the whole network trained on
 * 1% or 10% of the labelled training images.
 *
 *   train source ─label subset─▶ RandomResizedCrop(size) + flip ─▶ backbone (train mode: batch
 *       statistics, running ones updated) ─▶ Linear(featureDim, classes) ─▶ cross-entropy ─▶ SGD
 *       (trunk lr 0.01, head lr 0.2, momentum 0.9, no weight decay, MultiStepLR x0.2 at 12, 16)
 *   test source ─Resize + CenterCrop─▶ backbone (eval) ─▶ head ─▶ top-1 / top-5 after every epoch
 *
 * The model is the caller's in-memory copy (loaded from the checkpoint); nothing is written back.
 * The reference's head replaces the projection head (`resnet50(output_dim=1000)` with the
 * pretrained `projection_head.*` keys skipped for their shape), so it starts from torch's Linear
 * init, U(-1/sqrt(D), 1/sqrt(D)) for weight and bias; here drawn from the seed.
 *
 * Subsets: the reference reads SimCLR's lists of ImageNet file names (`1percent.txt`,
 * `10percent.txt`). `--labels FILE` takes such a list (one name per line, matched against the end of
 * each sample's path); `--labels 1%` / `10%` draws the same fraction per class, reproducibly from
 * the seed: round(fraction x class count) images (at least one) of each class.
 */
import * as tf from "@tensorflow/tfjs";
import { Effect, type Scope } from "effect";
import { readRegularText } from "../data/bounded_read.ts";
import { shown } from "../data/errors.ts";
import { rngFor } from "../data/rng.ts";
import type { DataSource } from "../data/sources.ts";
import { backboneForward } from "../models/resnet.ts";
import type { SwavModel } from "../models/model.ts";
import {
  batchLoader,
  crossEntropy,
  type EvalRunSettings,
  forEachBatch,
  Scoreboard,
  sgdUpdate,
  subsetSource,
  testPrepare,
  topClasses,
  trainCropPrepare,
} from "./eval_loop.ts";
import { EvaluationError } from "./evaluate_errors.ts";
import { EvaluationInputError } from "./knn.ts";
import { EpochTracker, type ImageEvaluation, type ImageEvaluationError } from "./linear_eval.ts";

export interface SemisupOptions extends EvalRunSettings<SemisupEpoch> {
  readonly numClasses: number;
  readonly epochs: number;
  readonly batchSize: number;
  /** Trunk (backbone) learning rate. */
  readonly lr: number;
  /** Head (last layer) learning rate. */
  readonly lrHead: number;
  readonly decayEpochs: readonly number[];
  readonly gamma: number;
  readonly momentum: number;
  readonly weightDecay: number;
  readonly seed: number;
}

/** eval_semisup.py's defaults (its README's 10% recipe; the 1% recipe uses lr 0.02, head 5). */
export const semisupDefaults = {
  epochs: 20,
  batchSize: 256,
  lr: 0.01,
  lrHead: 0.2,
  decayEpochs: [12, 16],
  gamma: 0.2,
  momentum: 0.9,
  weightDecay: 0,
  seed: 31,
} as const;

export interface SemisupEpoch {
  readonly epoch: number;
  /** Trunk learning rate of the epoch (the head's is in the same ratio). */
  readonly lr: number;
  readonly loss: number;
  readonly top1: number;
  readonly top5: number;
}

/** MultiStepLR's rate at (0-based) `epoch`: base x gamma^(milestones passed). */
export const multiStepLr = (
  base: number,
  epoch: number,
  milestones: readonly number[],
  gamma: number,
): number => base * gamma ** milestones.filter((m) => m <= epoch).length;

/** `1%`, `10%` (any percentage in (0, 100]) as a fraction, or undefined when SPEC is not one. */
export const parseLabelFraction = (spec: string): number | undefined => {
  const match = /^(\d+(?:\.\d+)?)%$/.exec(spec.trim());
  if (match === null) return undefined;
  const percent = Number(match[1]);
  return percent > 0 && percent <= 100 ? percent / 100 : undefined;
};

/**
 * Per class, round(fraction x count) samples (at least one), drawn by a permutation keyed by
 * (seed, class): the same seed and labels give the same subset. Returns sorted source indices.
 */
export const selectLabelSubset = (
  labels: Int32Array,
  classes: number,
  fraction: number,
  seed: number,
): number[] => {
  const byClass: number[][] = Array.from({ length: classes }, () => []);
  labels.forEach((label, index) => {
    if (label >= 0 && label < classes) byClass[label]!.push(index);
  });
  const chosen: number[] = [];
  byClass.forEach((members, c) => {
    if (members.length === 0) return;
    const take = Math.max(1, Math.round(fraction * members.length));
    const order = rngFor(seed, 0x5e15, c).permutation(members.length);
    for (let i = 0; i < take; i++) chosen.push(members[order[i]!]!);
  });
  return chosen.sort((a, b) => a - b);
};

/**
 * Source indices named by a subset file's lines (SimCLR's format: one image file name per line;
 * blank lines and `#` comments ignored). A line matches the sample whose path is that name or
 * ends in `/name` (so `cat/0001.png` picks one of two `0001.png`). Fails naming the first lines
 * that match nothing, and a line that matches two samples (naming both: never one picked silently).
 */
export const subsetFromNames = (
  paths: readonly string[],
  names: readonly string[],
  file: string,
): Effect.Effect<number[], EvaluationInputError> => {
  // Every path under each of its suffixes after a "/", with up to two distinct samples per suffix.
  const bySuffix = new Map<string, number[]>();
  const add = (key: string, index: number) => {
    const found = bySuffix.get(key);
    if (found === undefined) bySuffix.set(key, [index]);
    else if (found.length < 2 && !found.includes(index)) found.push(index);
  };
  paths.forEach((path, index) => {
    add(path, index);
    for (let at = path.indexOf("/"); at >= 0; at = path.indexOf("/", at + 1)) add(path.slice(at + 1), index);
  });
  const wanted = names.map((n) => n.trim()).filter((n) => n !== "" && !n.startsWith("#"));
  const missing = wanted.filter((n) => !bySuffix.has(n));
  if (wanted.length === 0) {
    return Effect.fail(new EvaluationInputError({ message: `--labels ${shown(file)} lists no image names` }));
  }
  if (missing.length > 0) {
    return Effect.fail(
      new EvaluationInputError({
        message: `--labels ${
          shown(file)
        }: ${missing.length} of ${wanted.length} names are not in the train source (first: ${
          missing.slice(0, 3).map((name) => shown(name, 60)).join(", ")
        })`,
      }),
    );
  }
  const ambiguous = wanted.find((n) => bySuffix.get(n)!.length > 1);
  if (ambiguous !== undefined) {
    const [a, b] = bySuffix.get(ambiguous)!.map((i) => paths[i]!);
    return Effect.fail(
      new EvaluationInputError({
        message: `--labels ${file}: ${JSON.stringify(ambiguous)} matches two samples, ${a} and ${b}: ` +
          "write it with its folder (e.g. class/name) so that it names one",
      }),
    );
  }
  return Effect.succeed([...new Set(wanted.map((n) => bySuffix.get(n)![0]!))].sort((a, b) => a - b));
};

/** Labels and paths of every sample of a source (fetched, not decoded). */
export const labelsAndPaths = (source: DataSource) =>
  Effect.gen(function* () {
    const raws = yield* Effect.forEach(
      Array.from({ length: source.length }, (_, i) => i),
      (i) => source.fetch(i).pipe(Effect.map((raw) => ({ path: raw.path, label: raw.label }))),
      { concurrency: 8 },
    );
    return { labels: Int32Array.from(raws, (r) => r.label), paths: raws.map((r) => r.path) };
  });

/** The fine-tuning head: torch's nn.Linear init, U(-b, b) with b = 1/sqrt(D), seeded. */
export const initialHead = (dim: number, classes: number, seed: number) => {
  const rng = rngFor(seed, 0x4ead);
  const bound = 1 / Math.sqrt(dim);
  const draw = () => rng.uniform(-bound, bound);
  return {
    weight: Float32Array.from({ length: dim * classes }, draw),
    bias: Float32Array.from({ length: classes }, draw),
  };
};

/** The trainable variables of the trunk (backbone) and the head with their momentum buffers. */
export interface FineTuneState extends Disposable {
  /** [D, C]. */
  readonly weight: tf.Variable;
  readonly bias: tf.Variable;
  readonly trunk: readonly tf.Variable[];
  readonly trunkMomentum: readonly tf.Variable[];
  readonly headMomentum: readonly tf.Variable[];
}

export const makeFineTuneState = (
  model: SwavModel,
  classes: number,
  seed: number,
  init?: { weight: Float32Array; bias: Float32Array },
): FineTuneState => {
  const dim = model.plan.featureDim;
  const start = init ?? initialHead(dim, classes, seed);
  const variable = (make: () => tf.Tensor) => tf.tidy(() => tf.variable(make()));
  const weight = variable(() => tf.tensor2d(start.weight, [dim, classes]));
  const bias = variable(() => tf.tensor1d(start.bias));
  const trunk = model.params.filter((p) => p.name.startsWith("backbone.") && p.variable.trainable).map((p) =>
    p.variable
  );
  const trunkMomentum = trunk.map((v) => variable(() => tf.zerosLike(v)));
  const headMomentum = [weight, bias].map((v) => variable(() => tf.zerosLike(v)));
  return {
    weight,
    bias,
    trunk,
    trunkMomentum,
    headMomentum,
    [Symbol.dispose]: () => tf.dispose([weight, bias, ...trunkMomentum, ...headMomentum]),
  };
};

/** Logits of the whole network: backbone (train or eval mode), then the head. */
export const fineTuneLogits = (model: SwavModel, state: FineTuneState, x: tf.Tensor4D, training: boolean) =>
  tf.tidy(() =>
    backboneForward(model.plan, model.param, x, { training }).matMul(state.weight).add(
      state.bias,
    ) as tf.Tensor2D
  );

/**
 * One fine-tuning step on a batch (train mode: BatchNorm's running statistics updated):
 * SGD on trunk (lr) and head (lrHead) parameter groups. Returns the batch's summed loss.
 */
export const fineTuneStep = (
  model: SwavModel,
  state: FineTuneState,
  x: tf.Tensor4D,
  labels: Int32Array,
  classes: number,
  rates: { lr: number; lrHead: number },
  sgd: { momentum: number; weightDecay: number },
): tf.Scalar =>
  tf.tidy(() => {
    const target = tf.tensor1d(labels, "int32") as tf.Tensor1D;
    const variables = [...state.trunk, state.weight, state.bias];
    const { value, grads } = tf.variableGrads(
      () => crossEntropy(fineTuneLogits(model, state, x, true), target, classes),
      variables,
    );
    const settings = { ...sgd, nesterov: false };
    state.trunk.forEach((v, i) => sgdUpdate(v, state.trunkMomentum[i]!, grads[v.name]!, rates.lr, settings));
    [state.weight, state.bias].forEach((v, i) =>
      sgdUpdate(v, state.headMomentum[i]!, grads[v.name]!, rates.lrHead, settings)
    );
    return value.mul(labels.length) as tf.Scalar;
  });

/** eval_semisup.py on `model` (changed in place: pass a copy) with the training subset `subset`. */
export const semisupEvaluation = (
  model: SwavModel,
  train: DataSource,
  subset: readonly number[],
  test: DataSource,
  options: SemisupOptions,
): Effect.Effect<ImageEvaluation, ImageEvaluationError, Scope.Scope> =>
  Effect.gen(function* () {
    const { input, numClasses: classes } = options;
    if (!(options.epochs >= 1)) {
      return yield* new EvaluationInputError({ message: "epochs must be at least 1" });
    }
    if (subset.length === 0) return yield* new EvaluationInputError({ message: "the label subset is empty" });
    const state = yield* Effect.acquireRelease(
      Effect.sync(() => makeFineTuneState(model, classes, options.seed)),
      (s) => Effect.sync(() => s[Symbol.dispose]()),
    );
    const common = { seed: options.seed, workers: options.workers, onError: options.onError };
    const trainLoader = yield* batchLoader({
      ...common,
      source: subsetSource(train, subset),
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
    const tracker = new EpochTracker();
    const sgd = { momentum: options.momentum, weightDecay: options.weightDecay };
    for (let epoch = 0; epoch < options.epochs; epoch++) {
      const rates = {
        lr: multiStepLr(options.lr, epoch, options.decayEpochs, options.gamma),
        lrHead: multiStepLr(options.lrHead, epoch, options.decayEpochs, options.gamma),
      };
      const lossParts: tf.Scalar[] = [];
      let seen = 0;
      yield* forEachBatch(trainLoader, epoch, input.size, input.channels, (x, labels) => {
        lossParts.push(fineTuneStep(model, state, x, labels, classes, rates, sgd));
        seen += labels.length;
      }, (done, total) => options.onProgress?.(`fine-tune epoch ${epoch + 1}`, done, total));
      const lossTotal = tf.tidy(() => lossParts.length === 0 ? tf.scalar(0) : tf.addN(lossParts));
      const loss = (yield* Effect.promise(() => lossTotal.data()))[0]! / Math.max(1, seen);
      tf.dispose([lossTotal, ...lossParts]);
      const board = new Scoreboard(classes);
      const tops: { top: tf.Tensor; labels: Int32Array }[] = [];
      yield* forEachBatch(testLoader, 0, input.size, input.channels, (x, labels) => {
        tops.push({
          top: tf.tidy(() => topClasses(fineTuneLogits(model, state, x, false), classes)),
          labels,
        });
      });
      for (const { top, labels } of tops) {
        const ranked = (yield* Effect.promise(() => top.data())) as Int32Array;
        board.add(ranked, Math.min(5, classes), labels);
      }
      tf.dispose(tops.map((t) => t.top));
      const report = tracker.record(epoch, rates.lr, loss, board.result());
      options.onEpoch?.(report, options.epochs);
    }
    return tracker.result();
  });

/** The largest `--labels` file read (64 MiB: ImageNet's full list of 1.28 M names is about 30 MB). */
const MAX_LABELS_BYTES = 64 * 2 ** 20;

/** The training subset of `--labels`: a fraction per class (`1%`, `10%`) or a file of image names. */
export const labelSubset = (train: DataSource, classes: number, spec: string, seed: number) =>
  Effect.gen(function* () {
    const fraction = parseLabelFraction(spec);
    if (fraction === undefined && /%\s*$/.test(spec)) {
      return yield* new EvaluationError({
        message: `--labels ${spec}: give a percentage in (0, 100], e.g. 1% or 10%`,
      });
    }
    const text = fraction !== undefined ? undefined : yield* readRegularText(spec, MAX_LABELS_BYTES).pipe(
      Effect.mapError((error) =>
        new EvaluationError({
          message: `--labels ${shown(spec)}: not 1%, 10% or a readable file of image names (${error.reason})`,
        })
      ),
    );
    const { labels, paths } = yield* labelsAndPaths(train);
    return text === undefined
      ? selectLabelSubset(labels, classes, fraction!, seed)
      : yield* subsetFromNames(paths, text.split("\n"), spec);
  });
