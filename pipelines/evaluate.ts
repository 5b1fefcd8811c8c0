/**
 * Evaluation of a pretrained backbone on a labelled train/test pair.
 *
 *   checkpoint (file, or run folder -> latest) -> model
 *   knn, linear --protocol features:
 *     train source ─extract─▶ features [N, D] ─┐
 *     test source  ─extract─▶ features [M, D] ─┴─▶ kNN (chunked) | linear probe -> scores
 *   linear --protocol paper: eval_linear.py through the frozen backbone (pipelines/linear_eval.ts)
 *   semisup: eval_semisup.py, the whole network fine-tuned on a label subset (pipelines/semisup.ts)
 *
 * Sources default to the run's data set: its train split, and `data.testSource`
 * or its test split. The test-time transform is the reference's: Resize(shorter
 * side) + CenterCrop(the first crop size), the run's mean and std; the resize is
 * `evalResizeFor(size)` (256 for 224) for every source, record data sets whose
 * images already have the crop size included (`evalResizeSide`).
 */
import { Effect, type Scope } from "effect";
import { decodeRunConfig, type RunConfig } from "../config/config.ts";
import type { DataSource } from "../data/sources.ts";
import { loadModelArrays, type SwavModel } from "../models/model.ts";
import { readCheckpointAt } from "./checkpoint.ts";
import { type EncoderInput, loadEncoder } from "./export.ts";
import { extractFeatures, type ExtractFeaturesError, type Features } from "./extract.ts";
import { knnClassify } from "./knn.ts";
import { type EvaluateError, EvaluationError, type LoadForEvaluationError } from "./evaluate_errors.ts";
import { linearEvalDefaults, linearEvaluation, type Pooling } from "./linear_eval.ts";
import { linearProbeDefaults, type ProbeEpoch, trainLinearProbe } from "./linear_probe.ts";
import { labelSubset, semisupDefaults, semisupEvaluation } from "./semisup.ts";
import { scopedModel, withSplit } from "./pretrain.ts";
import { evalResizeSide, openEvalSource, type ResizeOption } from "./eval_sources.ts";
import type {
  Evaluation,
  KnnEvaluation,
  LinearEvaluation,
  LinearProtocol,
  SemisupEvaluation,
} from "./evaluation_result.ts";
import { isTorchCheckpointFile, loadTorchForEvaluation } from "./torch_weights.ts";

export { labelSubset } from "./semisup.ts";
export { type EvaluateError, EvaluationError, type LoadForEvaluationError } from "./evaluate_errors.ts";
export { evalResizeSide, openEvalSource, parseResizeOption, type ResizeOption } from "./eval_sources.ts";
export {
  type EvaluatedSources,
  type Evaluation,
  evaluationJson,
  type KnnEvaluation,
  type LinearEvaluation,
  type LinearProtocol,
  type SemisupEvaluation,
} from "./evaluation_result.ts";

/** A backbone ready for feature extraction, with what it was trained on. */
export interface LoadedEncoder {
  /** The model (backbone, and head when the file held one). */
  readonly model: SwavModel;
  /** The input the backbone expects (the run's evaluation transform). */
  readonly input: EncoderInput;
  /** The run config (absent for an exported encoder folder). */
  readonly config: RunConfig | undefined;
  /** The checkpoint file or export folder it came from. */
  readonly path: string;
  /** Optimiser steps of the checkpoint (absent for an export). */
  readonly step: number | undefined;
  /** false: the file held no whole head (the parts it lacks are the model's random initial ones). */
  readonly hasHead?: boolean;
  /** The head parts a PyTorch file with part of the head lacked, as words (see `missingHeadMessage`). */
  readonly absentHead?: readonly string[];
}

const isExportFolder = (path: string) =>
  Effect.promise(() => Deno.stat(`${path}/model.json`).then((s) => s.isFile, () => false));

/** Where a warning goes (a damaged checkpoint skipped, an unverified older file). */
export type OnWarning = ((message: string) => void) | undefined;

/**
 * Loads PATH: a checkpoint file, a run folder (its newest checkpoint that
 * verifies; a newer damaged one is named in a warning), or a folder written by
 * `exportEncoder`. The scope disposes the model.
 *
 * @example Load the newest checkpoint of a (tiny, one-epoch) run folder
 * ```ts
 * import { Effect } from "effect";
 * import assert from "node:assert/strict";
 * import { decodeRunConfig, loadForEvaluation, pretrain, TensorBackend, writeDemoDataset } from "@swav/swav-ts";
 *
 * const data = await Deno.makeTempDir();
 * const out = await Deno.makeTempDir();
 * await writeDemoDataset({ folder: data, perClassTrain: 4, perClassTest: 2, size: 16, seed: 1 });
 * const loaded = await Effect.runPromise(Effect.scoped(Effect.gen(function* () {
 *   const config = yield* decodeRunConfig({
 *     data: { source: `${data}:train` },
 *     multicrop: { nmbCrops: [2, 2], sizeCrops: [16, 8], minScaleCrops: [0.3, 0.1], maxScaleCrops: [1, 0.3] },
 *     model: { arch: "resnet18", width: 4, stem: "cifar", hidden: 32, out: 16, prototypes: 20 },
 *     swav: { queueLength: 0 },
 *     train: { epochs: 1, batchSize: 8, out, knnEvery: 0 },
 *   });
 *   yield* pretrain(config);
 *   const { model, step, input } = yield* loadForEvaluation(out); // the model is disposed with the scope
 *   return { step, input, arch: model.config.arch };
 * })).pipe(Effect.provide(TensorBackend.layer("wasm"))));
 * assert.equal(loaded.step, 5); // 40 images in batches of 8
 * assert.equal(loaded.arch, "resnet18");
 * assert.equal(loaded.input.size, 16); // the run's evaluation transform comes with it
 * await Deno.remove(data, { recursive: true });
 * await Deno.remove(out, { recursive: true });
 * ```
 */
export const loadForEvaluation = (
  path: string,
  onWarning?: OnWarning,
): Effect.Effect<LoadedEncoder, LoadForEvaluationError, Scope.Scope> =>
  Effect.gen(function* () {
    if (yield* isTorchCheckpointFile(path)) return yield* loadTorchForEvaluation(path);
    if (yield* isExportFolder(path)) {
      const { model, input } = yield* loadEncoder(path);
      return { model, input, config: undefined, path, step: undefined, hasHead: false };
    }
    const { path: file, checkpoint } = yield* readCheckpointAt(path, { onWarning });
    const config = yield* decodeRunConfig(checkpoint.config, `${file} (its config)`).pipe(
      Effect.mapError((error) =>
        new EvaluationError({
          message: `checkpoint ${file} holds a config this build cannot read: ${error.message}`,
        })
      ),
    );
    const model = yield* scopedModel(config.model, 0);
    yield* loadModelArrays(model, checkpoint.arrays, `checkpoint ${file}`).pipe(
      Effect.mapError((error) => new EvaluationError({ message: error.message })),
    );
    return {
      model,
      input: {
        size: config.multicrop.sizeCrops[0]!,
        channels: config.model.inputChannels,
        mean: config.multicrop.mean,
        std: config.multicrop.std,
      },
      config,
      path: file,
      step: checkpoint.step,
    };
  });

/** The SOURCE specs to use: given ones, else the run's train split and test source. */
export const defaultSourceSpecs = (
  encoder: LoadedEncoder,
  given: { train?: string | undefined; test?: string | undefined },
): Effect.Effect<{ train: string; test: string }, EvaluationError> => {
  const config = encoder.config;
  const train = given.train ?? (config === undefined ? undefined : withSplit(config.data.source, "train"));
  const test = given.test ??
    (config === undefined ? undefined : config.data.testSource ?? withSplit(config.data.source, "test"));
  if (train === undefined || test === undefined) {
    return Effect.fail(
      new EvaluationError({
        message: `${encoder.path} is an exported encoder without a run config: give --train and --test`,
      }),
    );
  }
  return Effect.succeed({ train, test });
};

/** How `evaluate` scores a backbone: weighted kNN, a linear classifier, or semi-supervised fine-tuning. */
export type EvalMethod = "knn" | "linear" | "semisup";

/** What `evaluate` evaluates and how: the checkpoint, the method, the data and the method's settings (unset ones take the reference's defaults). */
export interface EvaluateOptions {
  /** A checkpoint file, a run folder, or an exported encoder folder. */
  readonly checkpoint: string;
  /** The evaluation method. */
  readonly method: EvalMethod;
  /** Linear evaluation: eval_linear.py on images (`paper`, the default for image folders) or the fast probe on precomputed features (`features`, the default otherwise). */
  readonly protocol?: LinearProtocol | undefined;
  /** Test-time resize (default `auto`). */
  readonly resize?: ResizeOption | undefined;
  /** RegLog's pooling (paper protocol; default global) and its optional BatchNorm (avgpool only). */
  readonly pooling?: Pooling | undefined;
  /** Paper protocol with avgpool: BatchNorm before the linear layer. */
  readonly batchNorm?: boolean | undefined;
  /** semisup: `1%`, `10%` or a file of image names. */
  readonly labels?: string | undefined;
  /** semisup: the head's learning rate (default 0.2; `lr` is the trunk's, default 0.01). */
  readonly lrHead?: number | undefined;
  /** SOURCE specs; default to the run's splits. */
  readonly train?: string | undefined;
  /** Test SOURCE spec; defaults to the run's `data.testSource` or its test split. */
  readonly test?: string | undefined;
  /** kNN neighbours and temperature (defaults: the run's train.knnK / knnTemperature, else 200 / 0.1). */
  readonly k?: number | undefined;
  /** kNN vote temperature. */
  readonly temperature?: number | undefined;
  /** Linear probe / fine-tuning settings (defaults: SwAV eval_linear.py, eval_semisup.py). */
  readonly epochs?: number | undefined;
  /** Learning rate of the classifier (semisup: of the trunk). */
  readonly lr?: number | undefined;
  /** Classifier training batch size. */
  readonly probeBatchSize?: number | undefined;
  /** Classifier weight decay. */
  readonly weightDecay?: number | undefined;
  /** Seed of the classifier's initialisation, shuffles and crops. */
  readonly seed?: number | undefined;
  /** Images per extraction batch and data workers. */
  readonly batchSize?: number | undefined;
  /** Data workers. */
  readonly workers?: number | undefined;
  /** Test rows per similarity chunk (bounds kNN memory at chunk x N). */
  readonly chunkSize?: number | undefined;
  /** Progress: phase ("train features", "test features", "linear probe", "linear eval epoch N", ...), done, total. */
  readonly onProgress?: ((phase: string, done: number, total: number) => void) | undefined;
  /** Called after each classifier epoch with its report. */
  readonly onProbeEpoch?: ((report: ProbeEpoch, epochs: number) => void) | undefined;
  /** Where warnings go (a damaged checkpoint skipped, an unverified older file). */
  readonly onWarning?: OnWarning;
}

/** Extracts a source's features with the encoder's evaluation transform (caller owns the tensor). */
export const extractWith = (
  encoder: LoadedEncoder,
  source: DataSource,
  options: Pick<EvaluateOptions, "batchSize" | "workers" | "seed" | "resize"> & {
    onProgress?: ((done: number, total: number) => void) | undefined;
  },
): Effect.Effect<Features, ExtractFeaturesError> => {
  const resize = evalResizeSide(options.resize ?? "auto", encoder.input.size, source.kind);
  return extractFeatures(encoder.model, source, {
    size: encoder.input.size,
    mean: encoder.input.mean,
    std: encoder.input.std,
    ...(resize === undefined ? {} : { resize }),
    batchSize: options.batchSize ?? 256,
    workers: options.workers ?? encoder.config?.data.workers ?? 1,
    ...(encoder.config === undefined ? {} : { onError: encoder.config.data.onError }),
    ...(options.onProgress === undefined ? {} : { onProgress: options.onProgress }),
  });
};

/** The source's class names, or an EvaluationError naming the unlabelled source. */
export const requireLabels = (source: DataSource, role: string, spec: string) =>
  source.classes === undefined
    ? Effect.fail(
      new EvaluationError({
        message: `the ${role} source ${spec} is unlabelled (no class folders): evaluation needs labels`,
      }),
    )
    : Effect.succeed(source.classes);

/** Confusion matrix and per-class accuracy of predictions. */
export const confusionOf = (predictions: Int32Array, labels: Int32Array, classes: number) => {
  const confusion = Array.from({ length: classes }, () => new Array<number>(classes).fill(0));
  labels.forEach((truth, i) => confusion[truth]![predictions[i]!]! += 1);
  const perClassAccuracy = confusion.map((row, c) => {
    const total = row.reduce((a, b) => a + b, 0);
    return total === 0 ? Number.NaN : row[c]! / total;
  });
  return { confusion, perClassAccuracy };
};

/**
 * Evaluates a checkpoint (or exported encoder) by kNN or a linear probe.
 *
 * @example kNN accuracy of an exported (here untrained) encoder on a tiny generated data set
 * ```ts
 * import { Effect, Schema } from "effect";
 * import assert from "node:assert/strict";
 * import { evaluate, exportEncoder, makeSwavModel, ModelConfig, TensorBackend, writeDemoDataset } from "@swav/swav-ts";
 *
 * const data = await Deno.makeTempDir();
 * const encoder = await Deno.makeTempDir();
 * await writeDemoDataset({ folder: data, perClassTrain: 2, perClassTest: 1, size: 16, seed: 1 });
 * const result = await Effect.runPromise(Effect.gen(function* () {
 *   using model = makeSwavModel(Schema.decodeUnknownSync(ModelConfig)({ arch: "resnet18", width: 4, stem: "cifar" }));
 *   yield* exportEncoder(model, encoder, { size: 16, mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25] });
 *   // a checkpoint file or a run folder works the same way
 *   return yield* evaluate({ checkpoint: encoder, method: "knn", train: `${data}:train`, test: `${data}:test`, k: 5 });
 * }).pipe(Effect.provide(TensorBackend.layer("wasm"))));
 * assert.equal(result.method, "knn");
 * assert.equal(result.testSamples, 10);
 * assert.ok(result.top1 >= 0 && result.top1 <= 1);
 * await Deno.remove(data, { recursive: true });
 * await Deno.remove(encoder, { recursive: true });
 * ```
 */
export const evaluate = (options: EvaluateOptions): Effect.Effect<Evaluation, EvaluateError> =>
  Effect.scoped(Effect.gen(function* () {
    const encoder = yield* loadForEvaluation(options.checkpoint, options.onWarning);
    const specs = yield* defaultSourceSpecs(encoder, options);
    const channels = encoder.model.config.inputChannels;
    const train = yield* openEvalSource(specs.train, channels);
    const test = yield* openEvalSource(specs.test, channels);
    const classes = yield* requireLabels(train, "train", specs.train);
    const testClasses = yield* requireLabels(test, "test", specs.test);
    if (testClasses.join("\n") !== classes.join("\n")) {
      return yield* new EvaluationError({
        message: `the train source ${specs.train} has classes [${classes.slice(0, 5)}${
          classes.length > 5 ? ", ..." : ""
        }] (${classes.length}) and the test source ${specs.test} [${testClasses.slice(0, 5)}${
          testClasses.length > 5 ? ", ..." : ""
        }] (${testClasses.length}): they must be the same classes`,
      });
    }
    const resize = evalResizeSide(options.resize ?? "auto", encoder.input.size, train.kind);
    if (resize !== undefined && resize < encoder.input.size) {
      return yield* new EvaluationError({
        message:
          `--resize ${resize} is smaller than the crop size ${encoder.input.size}: give at least ${encoder.input.size}`,
      });
    }
    const protocol = options.protocol ?? (train.kind === "folder" ? "paper" : "features");
    const own = encoder.config === undefined ? undefined : yield* defaultSourceSpecs(encoder, {});
    const common = {
      classes,
      trainSamples: train.length,
      testSamples: test.length,
      checkpoint: encoder.path,
      step: encoder.step,
      trainSource: specs.train,
      testSource: specs.test,
      ownSplits: own !== undefined && own.train === specs.train && own.test === specs.test,
    };
    if (options.method === "semisup" || (options.method === "linear" && protocol === "paper")) {
      const input = { ...encoder.input, channels, resize };
      const shared = {
        numClasses: classes.length,
        input,
        workers: options.workers ?? encoder.config?.data.workers ?? 1,
        onError: encoder.config?.data.onError ?? "skip",
        onEpoch: options.onProbeEpoch,
        onProgress: options.onProgress,
      };
      const given = {
        ...(options.epochs === undefined ? {} : { epochs: options.epochs }),
        ...(options.lr === undefined ? {} : { lr: options.lr }),
        ...(options.probeBatchSize === undefined ? {} : { batchSize: options.probeBatchSize }),
        ...(options.weightDecay === undefined ? {} : { weightDecay: options.weightDecay }),
        ...(options.seed === undefined ? {} : { seed: options.seed }),
      };
      if (options.method === "linear") {
        const settings = {
          ...linearEvalDefaults,
          ...shared,
          ...given,
          ...(options.pooling === undefined ? {} : { pooling: options.pooling }),
          ...(options.batchNorm === undefined ? {} : { batchNorm: options.batchNorm }),
        };
        const result = yield* linearEvaluation(encoder.model, train, test, settings);
        return {
          method: "linear",
          protocol: "paper",
          pooling: settings.pooling,
          batchNorm: settings.batchNorm,
          resize,
          epochs: settings.epochs,
          ...result,
          ...common,
        } satisfies LinearEvaluation;
      }
      const settings = {
        ...semisupDefaults,
        ...shared,
        ...given,
        ...(options.lrHead === undefined ? {} : { lrHead: options.lrHead }),
      };
      const labels = options.labels ?? "10%";
      const subset = yield* labelSubset(train, classes.length, labels, settings.seed);
      // The model was loaded for this evaluation alone: fine-tuning changes this copy, never the file.
      const result = yield* semisupEvaluation(encoder.model, train, subset, test, settings);
      return {
        method: "semisup",
        labels,
        subsetSamples: subset.length,
        epochs: settings.epochs,
        resize,
        ...result,
        ...common,
      } satisfies SemisupEvaluation;
    }
    const progress = (phase: string) =>
      options.onProgress === undefined
        ? undefined
        : (done: number, total: number) => options.onProgress!(phase, done, total);
    const trainFeatures = yield* Effect.acquireRelease(
      extractWith(encoder, train, {
        ...options,
        resize: resize ?? "none",
        onProgress: progress("train features"),
      }),
      (f) => Effect.sync(() => f.features.dispose()),
    );
    const testFeatures = yield* Effect.acquireRelease(
      extractWith(encoder, test, {
        ...options,
        resize: resize ?? "none",
        onProgress: progress("test features"),
      }),
      (f) => Effect.sync(() => f.features.dispose()),
    );
    if (trainFeatures.labels.length === 0 || testFeatures.labels.length === 0) {
      return yield* new EvaluationError({ message: "no readable samples in the train or test source" });
    }
    const extracted = {
      ...common,
      trainSamples: trainFeatures.labels.length,
      testSamples: testFeatures.labels.length,
    };
    if (options.method === "knn") {
      const k = options.k ?? encoder.config?.train.knnK ?? 200;
      const temperature = options.temperature ?? encoder.config?.train.knnTemperature ?? 0.1;
      const result = yield* knnClassify(
        trainFeatures.features,
        trainFeatures.labels,
        testFeatures.features,
        testFeatures.labels,
        {
          k,
          temperature,
          numClasses: classes.length,
          chunkSize: options.chunkSize ?? 256,
        },
      );
      return {
        method: "knn",
        top1: result.top1,
        top5: result.top5,
        k,
        temperature,
        resize,
        ...confusionOf(result.predictions, testFeatures.labels, classes.length),
        ...extracted,
      } satisfies KnnEvaluation;
    }
    const epochs = options.epochs ?? linearProbeDefaults.epochs;
    const result = yield* trainLinearProbe(
      trainFeatures.features,
      trainFeatures.labels,
      testFeatures.features,
      testFeatures.labels,
      {
        ...linearProbeDefaults,
        numClasses: classes.length,
        epochs,
        ...(options.lr === undefined ? {} : { lr: options.lr }),
        ...(options.probeBatchSize === undefined ? {} : { batchSize: options.probeBatchSize }),
        ...(options.weightDecay === undefined ? {} : { weightDecay: options.weightDecay }),
        ...(options.seed === undefined ? {} : { seed: options.seed }),
        ...(options.chunkSize === undefined ? {} : { chunkSize: options.chunkSize }),
        onEpoch: (report, total) => {
          options.onProbeEpoch?.(report, total);
          options.onProgress?.("linear probe", report.epoch, total);
        },
      },
    );
    return {
      method: "linear",
      protocol: "features",
      pooling: undefined,
      batchNorm: undefined,
      resize,
      top1: result.top1,
      top5: result.top5,
      lastTop1: result.lastTop1,
      lastTop5: result.lastTop5,
      bestEpoch: result.bestEpoch,
      epochs,
      perClassAccuracy: result.perClassAccuracy,
      confusion: result.confusion,
      history: result.history,
      ...extracted,
    } satisfies LinearEvaluation;
  }));
