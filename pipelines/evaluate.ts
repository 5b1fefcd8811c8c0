/**
 * Evaluation of a pretrained backbone: kNN or a linear probe on frozen,
 * globally pooled features of a labelled train/test pair.
 *
 *   checkpoint (file, or run folder -> latest) -> model (eval mode)
 *   train source ─extract─▶ features [N, D] ─┐
 *   test source  ─extract─▶ features [M, D] ─┴─▶ kNN (chunked) | linear probe -> scores
 *
 * Sources default to the run's data set: its train split, and `data.testSource`
 * or its test split. The evaluation transform is the run's: resize and centre
 * crop to the first crop size, its mean and std.
 */
import { Effect, Schema, type Scope } from "effect";
import { decodeRunConfig, type RunConfig } from "../config/config.ts";
import { type NpyValues, writeNpy } from "../data/npy.ts";
import { type DataSource, openSource } from "../data/sources.ts";
import { loadModelArrays, type SwavModel } from "../models/model.ts";
import { readCheckpointAt } from "./checkpoint.ts";
import { exportOnnx } from "./export_onnx.ts";
import { exportSafetensors } from "./export_safetensors.ts";
import { type EncoderInput, exportEncoder, loadEncoder } from "./export.ts";
import { extractFeatures, type Features } from "./extract.ts";
import { knnClassify } from "./knn.ts";
import { linearProbeDefaults, type ProbeEpoch, trainLinearProbe } from "./linear_probe.ts";
import { scopedModel, withSplit } from "./pretrain.ts";
import { resolveSourceSpec } from "./sources.ts";
import { isTorchCheckpointFile, loadTorchForEvaluation } from "./torch_weights.ts";

/** Evaluation cannot run as asked: wrong data, wrong checkpoint, nothing to compare. */
export class EvaluationError extends Schema.TaggedError<EvaluationError>()("EvaluationError", {
  message: Schema.String,
}) {}

/** A backbone ready for feature extraction, with what it was trained on. */
export interface LoadedEncoder {
  readonly model: SwavModel;
  readonly input: EncoderInput;
  /** The run config (absent for an exported encoder folder). */
  readonly config: RunConfig | undefined;
  /** The checkpoint file or export folder it came from. */
  readonly path: string;
  /** Optimiser steps of the checkpoint (absent for an export). */
  readonly step: number | undefined;
}

const isExportFolder = (path: string) =>
  Effect.promise(() => Deno.stat(`${path}/model.json`).then((s) => s.isFile, () => false));

/** Where a warning goes (a damaged checkpoint skipped, an unverified older file). */
export type OnWarning = ((message: string) => void) | undefined;

/**
 * Loads PATH: a checkpoint file, a run folder (its newest checkpoint that
 * verifies; a newer damaged one is named in a warning), or a folder written by
 * `exportEncoder`. The scope disposes the model.
 */
export const loadForEvaluation = (
  path: string,
  onWarning?: OnWarning,
): Effect.Effect<LoadedEncoder, unknown, Scope.Scope> =>
  Effect.gen(function* () {
    if (yield* isTorchCheckpointFile(path)) return yield* loadTorchForEvaluation(path);
    if (yield* isExportFolder(path)) {
      const { model, input } = yield* loadEncoder(path);
      return { model, input, config: undefined, path, step: undefined };
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

/** Opens a SOURCE spec (built-ins resolved) with the encoder's channel count. */
export const openEvalSource = (spec: string, channels: 1 | 3) =>
  Effect.gen(function* () {
    return yield* openSource(yield* resolveSourceSpec(spec), { channels });
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

export interface EvaluateOptions {
  /** A checkpoint file, a run folder, or an exported encoder folder. */
  readonly checkpoint: string;
  readonly method: "knn" | "linear";
  /** SOURCE specs; default to the run's splits. */
  readonly train?: string | undefined;
  readonly test?: string | undefined;
  /** kNN neighbours and temperature (defaults: the run's train.knnK / knnTemperature, else 200 / 0.1). */
  readonly k?: number | undefined;
  readonly temperature?: number | undefined;
  /** Linear probe settings (defaults: SwAV eval_linear.py). */
  readonly epochs?: number | undefined;
  readonly lr?: number | undefined;
  readonly probeBatchSize?: number | undefined;
  readonly weightDecay?: number | undefined;
  readonly seed?: number | undefined;
  /** Images per extraction batch and data workers. */
  readonly batchSize?: number | undefined;
  readonly workers?: number | undefined;
  /** Test rows per similarity chunk (bounds kNN memory at chunk x N). */
  readonly chunkSize?: number | undefined;
  /** Progress: phase ("train features", "test features", "linear probe"), done, total. */
  readonly onProgress?: ((phase: string, done: number, total: number) => void) | undefined;
  readonly onProbeEpoch?: ((report: ProbeEpoch, epochs: number) => void) | undefined;
  readonly onWarning?: OnWarning;
}

export interface KnnEvaluation {
  readonly method: "knn";
  readonly top1: number;
  readonly top5: number;
  readonly k: number;
  readonly temperature: number;
  readonly perClassAccuracy: number[];
  readonly confusion: number[][];
  readonly classes: readonly string[];
  readonly trainSamples: number;
  readonly testSamples: number;
  readonly checkpoint: string;
  readonly step: number | undefined;
}

export interface LinearEvaluation {
  readonly method: "linear";
  /** Best epoch's top-1 (and its top-5), as the reference reports. */
  readonly top1: number;
  readonly top5: number;
  readonly lastTop1: number;
  readonly lastTop5: number;
  readonly bestEpoch: number;
  readonly epochs: number;
  readonly perClassAccuracy: number[];
  readonly confusion: number[][];
  readonly history: readonly ProbeEpoch[];
  readonly classes: readonly string[];
  readonly trainSamples: number;
  readonly testSamples: number;
  readonly checkpoint: string;
  readonly step: number | undefined;
}

export type Evaluation = KnnEvaluation | LinearEvaluation;

/** The `--json` line: snake_case keys, accuracies as fractions in [0, 1]. */
export const evaluationJson = (result: Evaluation): Record<string, unknown> => {
  const common = {
    top1: result.top1,
    top5: result.top5,
    per_class_accuracy: result.perClassAccuracy,
    confusion: result.confusion,
    classes: result.classes,
    train_samples: result.trainSamples,
    test_samples: result.testSamples,
    checkpoint: result.checkpoint,
    step: result.step ?? null,
  };
  return result.method === "knn"
    ? { method: "knn", ...common, k: result.k, temperature: result.temperature }
    : {
      method: "linear",
      ...common,
      last_top1: result.lastTop1,
      last_top5: result.lastTop5,
      best_epoch: result.bestEpoch,
      epochs: result.epochs,
    };
};

/** Extracts a source's features with the encoder's evaluation transform (caller owns the tensor). */
export const extractWith = (
  encoder: LoadedEncoder,
  source: DataSource,
  options: Pick<EvaluateOptions, "batchSize" | "workers" | "seed"> & {
    onProgress?: ((done: number, total: number) => void) | undefined;
  },
): Effect.Effect<Features, unknown> =>
  extractFeatures(encoder.model, source, {
    size: encoder.input.size,
    mean: encoder.input.mean,
    std: encoder.input.std,
    batchSize: options.batchSize ?? 256,
    workers: options.workers ?? encoder.config?.data.workers ?? 1,
    ...(encoder.config === undefined ? {} : { onError: encoder.config.data.onError }),
    ...(options.onProgress === undefined ? {} : { onProgress: options.onProgress }),
  });

const requireLabels = (source: DataSource, role: string, spec: string) =>
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

/** Evaluates a checkpoint (or exported encoder) by kNN or a linear probe. */
export const evaluate = (options: EvaluateOptions): Effect.Effect<Evaluation, unknown> =>
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
    const progress = (phase: string) =>
      options.onProgress === undefined
        ? undefined
        : (done: number, total: number) => options.onProgress!(phase, done, total);
    const trainFeatures = yield* Effect.acquireRelease(
      extractWith(encoder, train, { ...options, onProgress: progress("train features") }),
      (f) => Effect.sync(() => f.features.dispose()),
    );
    const testFeatures = yield* Effect.acquireRelease(
      extractWith(encoder, test, { ...options, onProgress: progress("test features") }),
      (f) => Effect.sync(() => f.features.dispose()),
    );
    if (trainFeatures.labels.length === 0 || testFeatures.labels.length === 0) {
      return yield* new EvaluationError({ message: "no readable samples in the train or test source" });
    }
    const common = {
      classes,
      trainSamples: trainFeatures.labels.length,
      testSamples: testFeatures.labels.length,
      checkpoint: encoder.path,
      step: encoder.step,
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
        ...confusionOf(result.predictions, testFeatures.labels, classes.length),
        ...common,
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
      top1: result.top1,
      top5: result.top5,
      lastTop1: result.lastTop1,
      lastTop5: result.lastTop5,
      bestEpoch: result.bestEpoch,
      epochs,
      perClassAccuracy: result.perClassAccuracy,
      confusion: result.confusion,
      history: result.history,
      ...common,
    } satisfies LinearEvaluation;
  }));

export interface ExtractToFolderOptions {
  readonly checkpoint: string;
  /** SOURCE spec; defaults to the run's train split. */
  readonly data?: string | undefined;
  readonly out: string;
  readonly batchSize?: number | undefined;
  readonly workers?: number | undefined;
  readonly onProgress?: ((done: number, total: number) => void) | undefined;
  readonly onWarning?: OnWarning;
}

/**
 * Fails unless `folder` can be created and written: checked before any work,
 * so a bad `--out` costs nothing (a probe file is written and removed).
 */
export const ensureWritableFolder = (folder: string): Effect.Effect<void, EvaluationError> =>
  Effect.tryPromise({
    try: async () => {
      await Deno.mkdir(folder, { recursive: true });
      const probe = `${folder}/.swav-write-check-${crypto.randomUUID()}`;
      await Deno.writeFile(probe, new Uint8Array(0), { createNew: true });
      await Deno.remove(probe);
    },
    catch: (error) =>
      new EvaluationError({
        message: `cannot write to ${folder}: ${
          error instanceof Error ? error.message : String(error)
        }: give --out a folder you can write`,
      }),
  });

/** What `extractToFolder` wrote (also the content of `features.json`). */
export interface ExtractSidecar {
  readonly features: string;
  readonly labels: string;
  readonly indices: string;
  readonly count: number;
  readonly dim: number;
  readonly dtype: { features: "float32"; labels: "int64"; indices: "int64" };
  readonly source: string;
  readonly split: string;
  readonly classes: readonly string[] | null;
  readonly checkpoint: string;
  readonly step: number | null;
  readonly model: SwavModel["config"];
  readonly input: EncoderInput;
  readonly skipped: number;
}

const toInt64 = (values: Int32Array): NpyValues => BigInt64Array.from(values, (v) => BigInt(v));

/**
 * Writes pooled features of a source to `out/features.npy` (float32 [N, D]),
 * `out/labels.npy` (int64 [N], -1 unlabelled), `out/indices.npy` (int64 [N],
 * source index of each row) and `out/features.json` (the sidecar).
 */
export const extractToFolder = (options: ExtractToFolderOptions): Effect.Effect<ExtractSidecar, unknown> =>
  Effect.scoped(Effect.gen(function* () {
    yield* ensureWritableFolder(options.out);
    const encoder = yield* loadForEvaluation(options.checkpoint, options.onWarning);
    const spec = options.data ??
      (encoder.config === undefined ? undefined : withSplit(encoder.config.data.source, "train"));
    if (spec === undefined) {
      return yield* new EvaluationError({
        message: `${encoder.path} is an exported encoder without a run config: give --data`,
      });
    }
    const source = yield* openEvalSource(spec, encoder.model.config.inputChannels);
    const extracted = yield* Effect.acquireRelease(
      extractWith(encoder, source, options),
      (f) => Effect.sync(() => f.features.dispose()),
    );
    const [count, dim] = extracted.features.shape;
    const values = (yield* Effect.promise(() => extracted.features.data())) as Float32Array;
    const sidecar: ExtractSidecar = {
      features: "features.npy",
      labels: "labels.npy",
      indices: "indices.npy",
      count,
      dim,
      dtype: { features: "float32", labels: "int64", indices: "int64" },
      source: spec,
      split: source.split,
      classes: source.classes ?? null,
      checkpoint: encoder.path,
      step: encoder.step ?? null,
      model: encoder.model.config,
      input: encoder.input,
      skipped: source.length - count,
    };
    yield* Effect.tryPromise({
      try: async () => {
        await Deno.mkdir(options.out, { recursive: true });
        await Effect.runPromise(writeNpy(`${options.out}/features.npy`, values, [count, dim]));
        await Effect.runPromise(writeNpy(`${options.out}/labels.npy`, toInt64(extracted.labels), [count]));
        await Effect.runPromise(writeNpy(`${options.out}/indices.npy`, toInt64(extracted.indices), [count]));
        await Deno.writeTextFile(`${options.out}/features.json`, JSON.stringify(sidecar, null, 2) + "\n");
      },
      catch: (error) =>
        new EvaluationError({
          message: `cannot write to ${options.out}: ${
            error instanceof Error ? error.message : String(error)
          }`,
        }),
    });
    return sidecar;
  }));

/** Exports the backbone of PATH (checkpoint or run folder) to `out` (see `pipelines/export.ts`). */
/** What `export` writes: TF.js weights (a folder), safetensors or ONNX (a file). */
export type ExportFormat = "tfjs" | "safetensors" | "onnx";

export const exportCheckpointEncoder = (
  checkpoint: string,
  out: string,
  onWarning?: OnWarning,
  options: { readonly format?: ExportFormat; readonly head?: boolean } = {},
): Effect.Effect<string, unknown> =>
  Effect.scoped(Effect.gen(function* () {
    const format = options.format ?? "tfjs";
    // A folder for TF.js; the file's folder otherwise. Checked before any work.
    yield* ensureWritableFolder(format === "tfjs" ? out : parentFolder(out));
    const encoder = yield* loadForEvaluation(checkpoint, onWarning);
    if (format === "safetensors") return yield* exportSafetensors(encoder.model, out, { head: options.head });
    if (format === "onnx") return yield* exportOnnx(encoder.model, out, { head: options.head });
    return yield* exportEncoder(encoder.model, out, encoder.input);
  }));

const parentFolder = (path: string): string => {
  const slash = path.lastIndexOf("/");
  return slash < 0 ? "." : slash === 0 ? "/" : path.slice(0, slash);
};
