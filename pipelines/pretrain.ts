/**
 * The pretraining pipeline, top to bottom as in the paper's figure:
 *
 *   source ──decode──▶ image ──multicrop──▶ crops (2 large + V small, per sample, in Workers)
 *          ──batch──▶ crop groups ──encode──▶ z, scores ──sinkhorn (detached, + queue)──▶ codes
 *          ──swappedLoss──▶ loss ──optimise (LARC-SGD, schedule, frozen prototypes)──▶ weights
 *          ──▶ queue update, metrics, checkpoints
 *
 * State with an owner, all released by the run's scope (interruption included):
 * the model's variables, the optimiser's momentum slots, the embedding queue,
 * the worker pool. Checkpoints are atomic; a non-finite loss stops the run
 * before the update, so the last checkpoint and the weights stay good.
 */
import type * as tf from "@tensorflow/tfjs";
import { Effect, Ref, Schema, Stream } from "effect";
import { TensorBackend } from "../backend/tensor_backend.ts";
import type { RunConfig } from "../config/config.ts";
import { makeLoader } from "../data/loader.ts";
import { multicropPrepare } from "../stages/multicrop.ts";
import { openSource } from "../data/sources.ts";
import { disposeModel, makeSwavModel, type SwavModel } from "../models/model.ts";
import { checkFitsBackend } from "../stages/encode.ts";
import { larcOptions, makeLarcSgd } from "../stages/optimise.ts";
import { type EmbeddingQueue, makeQueue, queueActiveAt } from "../state/queue.ts";
import { latestCheckpoint, restoreRun, type RunPosition, saveCheckpoint } from "./checkpoint.ts";
import { collapseWarning } from "./collapse.ts";
import { knnTop1 } from "./knn.ts";
import { runRecords } from "./run_records.ts";
import { type SwavStages, swavStages, swavTrainStep } from "./swav_step.ts";
import { resolveSourceSpec } from "./sources.ts";

export { NonFiniteLoss } from "./swav_step.ts";

/** One line of `metrics.jsonl`. */
export interface StepMetrics {
  readonly epoch: number;
  readonly step: number;
  readonly loss: number;
  readonly lr: number;
  readonly images_per_s: number;
  readonly code_entropy: number;
  readonly prototypes_in_use: number;
}

export interface EpochReport {
  readonly epoch: number;
  readonly meanLoss: number;
  readonly knnTop1?: number;
  readonly seconds: number;
}

export interface PretrainHooks {
  /** After every step. */
  readonly onStep?: (
    metrics: StepMetrics,
    progress: { stepInEpoch: number; stepsPerEpoch: number; totalSteps: number },
  ) => void;
  readonly onEpoch?: (report: EpochReport) => void;
  readonly onWarning?: (message: string) => void;
  readonly onInfo?: (message: string) => void;
}

export interface PretrainResult {
  readonly steps: number;
  readonly epochs: number;
  readonly lastLoss: number;
  readonly epochReports: readonly EpochReport[];
  readonly runFolder: string;
  readonly checkpoint: string | undefined;
  readonly skippedSamples: number;
}

/** Fewer samples than one batch. */
export class DatasetTooSmall extends Schema.TaggedError<DatasetTooSmall>()("DatasetTooSmall", {
  message: Schema.String,
}) {}

/** The run folder (config, seed, metrics) could not be written. */
export class RunFolderError extends Schema.TaggedError<RunFolderError>()("RunFolderError", {
  path: Schema.String,
  message: Schema.String,
}) {}

const writeFile = <A>(path: string, write: () => Promise<A>) =>
  Effect.tryPromise({
    try: write,
    catch: (error) =>
      new RunFolderError({
        path,
        message: `cannot write ${path}: ${error instanceof Error ? error.message : error}`,
      }),
  });

const writeJson = (path: string, value: unknown) =>
  writeFile(path, () => Deno.writeTextFile(path, JSON.stringify(value, null, 2) + "\n"));

/** The run folder with its resolved config and seed, and `metrics.jsonl` open for appending (closed by the scope). */
const openRunFolder = (config: RunConfig) =>
  Effect.gen(function* () {
    const folder = config.train.out;
    yield* writeFile(folder, () => Deno.mkdir(folder, { recursive: true }));
    yield* writeJson(`${folder}/config.json`, config);
    yield* writeJson(`${folder}/seed.json`, { seed: config.train.seed });
    const path = `${folder}/metrics.jsonl`;
    const file = yield* Effect.acquireRelease(
      writeFile(path, () => Deno.open(path, { append: true, create: true, write: true })),
      (file) => Effect.sync(() => file.close()),
    );
    const encoder = new TextEncoder();
    return (metrics: StepMetrics) =>
      writeFile(path, () => file.write(encoder.encode(JSON.stringify(metrics) + "\n")));
  });

const sourceOptions = (config: RunConfig) =>
  config.data.channels === undefined ? {} : { channels: config.data.channels };

/** The labelled train/test splits for the periodic kNN check, when asked for and the source has labels. */
const openKnnSources = (config: RunConfig, labelled: boolean) =>
  Effect.gen(function* () {
    if (config.train.knnEvery <= 0 || !labelled) return undefined;
    const { source, testSource } = config.data;
    const train = yield* openSource(
      yield* resolveSourceSpec(withSplit(source, "train")),
      sourceOptions(config),
    );
    const test = yield* openSource(
      yield* resolveSourceSpec(testSource ?? withSplit(source, "test")),
      sourceOptions(config),
    );
    return { train, test };
  });

/** The training source and its loader: decode -> multicrop in a Worker pool, batched (the scope stops it). */
const openTrainingData = (config: RunConfig) =>
  Effect.gen(function* () {
    const { batchSize, seed } = config.train;
    const source = yield* openSource(yield* resolveSourceSpec(config.data.source), sourceOptions(config));
    if (source.length < batchSize) {
      return yield* new DatasetTooSmall({
        message:
          `the data set has ${source.length} samples, fewer than one batch of ${batchSize}: lower train.batchSize`,
      });
    }
    const loader = yield* makeLoader({
      source,
      prepare: multicropPrepare(config.multicrop),
      seed,
      batchSize,
      dropLast: true,
      workers: config.data.workers,
      bufferBatches: config.data.prefetch,
      onError: config.data.onError,
    });
    return { source, loader };
  });

/** The embedding queue, created at swav.queueStartEpoch (or on resume); the run's scope disposes it. */
const queueKeeper = (config: RunConfig, hooks: PretrainHooks) => {
  let queue: EmbeddingQueue | undefined;
  const { swav } = config;
  return {
    current: () => queue,
    ensure: (epoch: number) =>
      Effect.gen(function* () {
        if (queue === undefined && queueActiveAt(epoch, swav)) {
          queue = yield* makeQueue({
            length: swav.queueLength,
            batchSize: config.train.batchSize,
            dim: config.model.out,
            cropsForAssign: swav.cropsForAssign,
          });
          hooks.onInfo?.(
            `epoch ${epoch + 1}: queue of ${queue.length} embeddings per assignment crop created`,
          );
        }
        return queue;
      }),
  };
};

const skippedWarning = (skipped: { count: number; examples: readonly { path: string; reason: string }[] }) =>
  `${skipped.count} unreadable samples were skipped, e.g. ${
    skipped.examples.slice(0, 3).map((e) => `${e.path} (${e.reason})`).join("; ")
  }`;

/** Named trainable variables of a model, keyed by parameter name. */
const trainableByName = (model: SwavModel): Record<string, tf.Variable> =>
  Object.fromEntries(model.params.filter((p) => p.trainable).map((p) => [p.name, p.variable]));

/** A model whose variables the scope disposes. */
export const scopedModel = (config: SwavModel["config"], seed: number) =>
  Effect.acquireRelease(
    Effect.sync(() => makeSwavModel(config, seed)),
    (model) => Effect.sync(() => disposeModel(model)),
  );

export interface PretrainOptions {
  /** Continue from the latest checkpoint in the run folder. */
  readonly resume?: boolean;
  readonly hooks?: PretrainHooks;
  /** Replaces stages of the SwAV step by stage values of the same types: a custom pipeline. */
  readonly stages?: Partial<SwavStages>;
}

/** The run's counters, folded per step (and reset per epoch), never mutated in place. */
interface Progress {
  readonly step: number;
  readonly lastLoss: number;
  readonly lastCheckpoint: string | undefined;
  readonly stopped: boolean;
  /** The current epoch's batches done, loss sum and count, and whether collapse was reported in it. */
  readonly batchInEpoch: number;
  readonly lossSum: number;
  readonly lossCount: number;
  readonly collapseWarned: boolean;
}

const afterStep = (p: Progress, loss: number): Progress => ({
  ...p,
  step: p.step + 1,
  batchInEpoch: p.batchInEpoch + 1,
  lastLoss: loss,
  lossSum: p.lossSum + loss,
  lossCount: p.lossCount + 1,
});

const newEpoch = (p: Progress, skip: number): Progress => ({
  ...p,
  batchInEpoch: skip,
  lossSum: 0,
  lossCount: 0,
  collapseWarned: false,
});

/**
 * Pretrains a SwAV model as `config` says. With `resume`, continues exactly
 * from the latest checkpoint in the run folder.
 */
export const pretrain = (config: RunConfig, options: PretrainOptions = {}) =>
  Effect.scoped(Effect.gen(function* () {
    const hooks = options.hooks ?? {};
    const backend = yield* TensorBackend;
    const { train: trainConfig, swav } = config;
    const { out: runFolder, batchSize } = trainConfig;

    // Data: source -> decode -> multicrop, in a Worker pool, batched.
    const { source, loader } = yield* openTrainingData(config);
    const stepsPerEpoch = loader.batchesPerEpoch;

    // State owned by this scope: model, optimiser, and the queue (created at queueStartEpoch or on resume).
    yield* checkFitsBackend(config.model, batchSize, config.multicrop, backend.name);
    const model = yield* scopedModel(config.model, trainConfig.seed);
    const optimiser = yield* makeLarcSgd(larcOptions(config.optim));
    const queues = queueKeeper(config, hooks);
    const state = { model, variables: trainableByName(model), optimiser, queue: queues.current };
    const trainStep = yield* swavTrainStep(config, state, { batchSize, itersPerEpoch: stepsPerEpoch }, {
      ...swavStages,
      ...options.stages,
    });
    const { seed, keepCheckpoints } = trainConfig;
    const save = (position: RunPosition) =>
      saveCheckpoint(runFolder, keepCheckpoints, position, {
        ...state,
        queue: queues.current(),
        config,
        seed,
        backend: backend.name,
      });

    // Where we start: fresh, or from the latest checkpoint.
    const latest = options.resume ? yield* latestCheckpoint(runFolder) : undefined;
    if (options.resume && latest === undefined) {
      hooks.onWarning?.(`--resume: no checkpoint in ${runFolder}; starting from scratch`);
    }
    const start: RunPosition = latest === undefined
      ? { step: 0, epoch: 0, batchInEpoch: 0 }
      : yield* restoreRun(latest, {
        model,
        optimiser,
        queueStartEpoch: swav.queueStartEpoch,
        queueFor: queues.ensure,
      });
    const resumedAt = `step ${start.step} (epoch ${start.epoch + 1}, batch ${start.batchInEpoch})`;
    if (latest !== undefined) hooks.onInfo?.(`resumed from ${latest} at ${resumedAt}`);

    const writeMetrics = yield* openRunFolder(config);
    const records = runRecords(runFolder);
    const knnSources = yield* openKnnSources(config, source.classes !== undefined);
    const reports: EpochReport[] = [];
    const totalSteps = trainConfig.maxSteps > 0
      ? Math.min(trainConfig.maxSteps, stepsPerEpoch * trainConfig.epochs)
      : stepsPerEpoch * trainConfig.epochs;
    const progress = yield* Ref.make<Progress>({
      ...newEpoch({} as Progress, 0),
      step: start.step,
      lastLoss: Number.NaN,
      lastCheckpoint: undefined,
      stopped: false,
    });

    for (let epoch = start.epoch; epoch < trainConfig.epochs; epoch++) {
      if ((yield* Ref.get(progress)).stopped) break;
      yield* queues.ensure(epoch);
      const epochStart = performance.now();
      const skip = epoch === start.epoch ? start.batchInEpoch : 0;
      const before = yield* Ref.updateAndGet(progress, (p) => newEpoch(p, skip));
      yield* loader.epoch(epoch).pipe(
        Stream.drop(skip),
        // maxSteps caps the run: take exactly the steps left (a predicate would see chunks ahead of the steps).
        Stream.take(
          trainConfig.maxSteps === 0
            ? Number.POSITIVE_INFINITY
            : Math.max(0, trainConfig.maxSteps - before.step),
        ),
        Stream.runForEach((batch) =>
          Effect.scoped(Effect.gen(function* () {
            const t0 = performance.now();
            // The step, stage by stage (pipelines/swav_step.ts).
            const { loss, lr, codeEntropy, prototypesInUse } = yield* trainStep({
              batch,
              step: (yield* Ref.get(progress)).step,
              epoch,
            });
            let p = yield* Ref.updateAndGet(progress, (p) => afterStep(p, loss));
            const metrics: StepMetrics = {
              epoch: epoch + 1,
              step: p.step,
              loss,
              lr,
              images_per_s: batchSize / ((performance.now() - t0) / 1000),
              code_entropy: codeEntropy,
              prototypes_in_use: prototypesInUse,
            };
            yield* writeMetrics(metrics);
            hooks.onStep?.(metrics, { stepInEpoch: p.batchInEpoch, stepsPerEpoch, totalSteps });
            const collapse = p.collapseWarned ? undefined : collapseWarning(p.step, loss, prototypesInUse, {
              prototypes: config.model.prototypes,
              freezePrototypesIters: swav.freezePrototypesIters,
            });
            if (collapse !== undefined) {
              p = yield* Ref.updateAndGet(progress, (p) => ({ ...p, collapseWarned: true }));
              hooks.onWarning?.(collapse);
              yield* records.event(p.step, "collapse", collapse);
            }
            if (trainConfig.checkpointEvery > 0 && p.step % trainConfig.checkpointEvery === 0) {
              const path = yield* save({ step: p.step, epoch, batchInEpoch: p.batchInEpoch });
              yield* Ref.update(progress, (p) => ({ ...p, lastCheckpoint: path }));
            }
          }))
        ),
      );
      const p = yield* Ref.get(progress);
      const finishedEpoch = p.batchInEpoch >= stepsPerEpoch;
      // Stopped by maxSteps: checkpoint where we are, so --resume continues from here.
      const path = yield* save(
        finishedEpoch
          ? { step: p.step, epoch: epoch + 1, batchInEpoch: 0 }
          : { step: p.step, epoch, batchInEpoch: p.batchInEpoch },
      );
      yield* Ref.set(progress, { ...p, lastCheckpoint: path, stopped: !finishedEpoch });
      const knn = finishedEpoch && knnSources !== undefined && (epoch + 1) % trainConfig.knnEvery === 0
        ? yield* knnTop1(model, knnSources.train, knnSources.test, config)
        : undefined;
      const report: EpochReport = {
        epoch: epoch + 1,
        meanLoss: p.lossCount === 0 ? Number.NaN : p.lossSum / p.lossCount,
        seconds: (performance.now() - epochStart) / 1000,
        ...(knn === undefined ? {} : { knnTop1: knn }),
      };
      reports.push(report);
      hooks.onEpoch?.(report);
      yield* records.epoch(report);
    }
    const skipped = yield* loader.skipped;
    if (skipped.count > 0) hooks.onWarning?.(skippedWarning(skipped));
    if (skipped.count > 0) {
      yield* records.event((yield* Ref.get(progress)).step, "skipped", skippedWarning(skipped));
    }
    const { step, lastLoss, lastCheckpoint } = yield* Ref.get(progress);
    return {
      steps: step,
      epochs: reports.length === 0 ? start.epoch : reports.at(-1)!.epoch,
      lastLoss,
      epochReports: reports,
      runFolder,
      checkpoint: lastCheckpoint,
      skippedSamples: skipped.count,
    } satisfies PretrainResult;
  }));

/** `path[:split]` with its split replaced. */
export const withSplit = (spec: string, split: "train" | "test"): string =>
  `${spec.replace(/:(train|test|val)$/, "")}:${split}`;
