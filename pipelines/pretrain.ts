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
import * as tf from "@tensorflow/tfjs";
import { Effect, Ref, Stream } from "effect";
import { TensorBackend } from "../backend/tensor_backend.ts";
import type { RunConfig } from "../config/config.ts";
import { makeLoader } from "../data/loader.ts";
import { multicropPrepare } from "../stages/multicrop.ts";
import { type DataSource, openSource } from "../data/sources.ts";
import { disposeModel, makeSwavModel, modelForward, type SwavModel } from "../models/model.ts";
import { checkFitsBackend } from "../stages/encode.ts";
import { learningRateAt, type LrSchedule, makeLarcSgd, scheduleFromEpochs } from "../stages/optimise.ts";
import { assignmentCodes, swappedLossFromCodes } from "../stages/swapped_loss.ts";
import {
  type EmbeddingQueue,
  makeQueue,
  queueActiveAt,
  restore as restoreQueue,
  serialise as serialiseQueue,
} from "../state/queue.ts";
import {
  type Checkpoint,
  latestCheckpoint,
  pruneCheckpoints,
  readCheckpoint,
  writeCheckpoint,
} from "./checkpoint.ts";
import { extractFeatures } from "./extract.ts";
import { knnClassify } from "./knn.ts";
import type { TrainStepParts } from "./train_step.ts";
import { swavTrainStep, TrainingState } from "./swav_step.ts";
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

/** The SwAV step parts for a model: backbone per resolution group + head, Sinkhorn codes, swapped loss. */
export const swavParts = (model: SwavModel, config: RunConfig, batchSize: number): TrainStepParts => {
  const layout = {
    batchSize,
    nmbCrops: config.multicrop.nmbCrops,
    cropsForAssign: config.swav.cropsForAssign,
  };
  return {
    encode: (crops) => {
      const { embeddings, scores } = modelForward(model, crops, { training: true });
      return { embeddings, scores };
    },
    assign: (scores, queueScores) =>
      assignmentCodes(scores, {
        ...layout,
        epsilon: config.swav.epsilon,
        iterations: config.swav.sinkhornIterations,
        ...(queueScores === undefined ? {} : { queueScores }),
      }),
    loss: (scores, codes) =>
      swappedLossFromCodes(scores, codes, { ...layout, temperature: config.swav.temperature }),
  };
};

/** Named trainable variables of a model, keyed by parameter name. */
const trainableByName = (model: SwavModel): Record<string, tf.Variable> =>
  Object.fromEntries(model.params.filter((p) => p.trainable).map((p) => [p.name, p.variable]));

/** A model whose variables the scope disposes. */
export const scopedModel = (config: SwavModel["config"], seed: number) =>
  Effect.acquireRelease(
    Effect.sync(() => makeSwavModel(config, seed)),
    (model) => Effect.sync(() => disposeModel(model)),
  );

/** Copies the model's variables into checkpoint arrays. */
export const modelArrays = async (
  model: SwavModel,
): Promise<{ name: string; shape: number[]; values: Float32Array }[]> => {
  const out = [];
  for (const p of model.params) {
    out.push({
      name: p.name,
      shape: [...p.variable.shape],
      values: (await p.variable.data()) as Float32Array,
    });
  }
  return out;
};

/** Loads checkpoint arrays into the model's variables (every parameter must be present, with its shape). */
export const loadModelArrays = (model: SwavModel, checkpoint: Checkpoint, path: string): void => {
  const byName = new Map(checkpoint.arrays.map((a) => [a.name, a]));
  for (const p of model.params) {
    const array = byName.get(p.name);
    if (array === undefined) {
      throw new Error(`checkpoint ${path} lacks parameter ${p.name}: another architecture?`);
    }
    if (array.shape.join("x") !== p.variable.shape.join("x")) {
      throw new Error(
        `checkpoint ${path}: ${p.name} has shape [${array.shape}], the model [${p.variable.shape}]: another architecture?`,
      );
    }
    tf.tidy(() => p.variable.assign(tf.tensor(array.values, p.variable.shape, "float32")));
  }
};

const writeJson = (path: string, value: unknown) =>
  Effect.promise(() => Deno.writeTextFile(path, JSON.stringify(value, null, 2) + "\n"));

/** kNN top-1 of the current backbone on a labelled train/test pair. */
export const knnTop1 = (
  model: SwavModel,
  train: DataSource,
  test: DataSource,
  config: RunConfig,
) =>
  Effect.gen(function* () {
    const size = config.multicrop.sizeCrops[0]!;
    const common = {
      size,
      mean: config.multicrop.mean,
      std: config.multicrop.std,
      workers: config.data.workers,
      onError: config.data.onError,
    };
    const a = yield* extractFeatures(model, train, common);
    const b = yield* extractFeatures(model, test, common);
    const result = yield* Effect.promise(() =>
      knnClassify(a.features, a.labels, b.features, b.labels, {
        k: config.train.knnK,
        temperature: config.train.knnTemperature,
        numClasses: train.classes?.length ?? 1 + Math.max(...a.labels),
      })
    ).pipe(Effect.ensuring(Effect.sync(() => tf.dispose([a.features, b.features]))));
    return result.top1;
  });

/**
 * Pretrains a SwAV model as `config` says. With `resume`, continues exactly
 * from the latest checkpoint in the run folder.
 */
export interface PretrainOptions {
  /** Continue from the latest checkpoint in the run folder. */
  readonly resume?: boolean;
  readonly hooks?: PretrainHooks;
  /** Replaces the SwAV step parts (encoder, assignment, loss): a custom pipeline. Defaults to `swavParts`. */
  readonly parts?: (model: SwavModel, config: RunConfig, batchSize: number) => TrainStepParts;
}

export const pretrain = (config: RunConfig, options: PretrainOptions = {}) =>
  Effect.scoped(Effect.gen(function* () {
    const hooks = options.hooks ?? {};
    const backend = yield* TensorBackend;
    const { train: trainConfig, swav } = config;
    const runFolder = trainConfig.out;
    const batchSize = trainConfig.batchSize;

    // Data: source -> decode -> multicrop, in a Worker pool, batched.
    const source = yield* openSource(
      yield* resolveSourceSpec(config.data.source),
      config.data.channels === undefined ? {} : { channels: config.data.channels },
    );
    if (source.length < batchSize) {
      return yield* Effect.fail(
        new Error(
          `the data set has ${source.length} samples, fewer than one batch of ${batchSize}: lower train.batchSize`,
        ),
      );
    }
    const loader = yield* makeLoader({
      source,
      prepare: multicropPrepare(config.multicrop),
      seed: trainConfig.seed,
      batchSize,
      dropLast: true,
      workers: config.data.workers,
      bufferBatches: config.data.prefetch,
      onError: config.data.onError,
    });

    // Model, optimiser: state owned by this scope.
    yield* checkFitsBackend(config.model, batchSize, config.multicrop, backend.name);
    const model = yield* scopedModel(config.model, trainConfig.seed);
    const variables = trainableByName(model);
    const optimiser = yield* makeLarcSgd({
      momentum: config.optim.momentum,
      weightDecay: config.optim.weightDecay,
      trustCoefficient: config.optim.trust,
      eps: 1e-8,
      clip: false,
    });
    const parts = (options.parts ?? swavParts)(model, config, batchSize);
    const trainStep = swavTrainStep(config);
    const stepsPerEpoch = loader.batchesPerEpoch;
    const schedule: LrSchedule = scheduleFromEpochs({
      epochs: trainConfig.epochs,
      warmupEpochs: config.optim.warmupEpochs,
      itersPerEpoch: stepsPerEpoch,
      startWarmup: config.optim.startWarmup,
      baseLr: config.optim.baseLr,
      finalLr: config.optim.finalLr,
    });

    // The embedding queue, created at queueStartEpoch (or on resume); the run's scope disposes it.
    let queue: EmbeddingQueue | undefined;
    const ensureQueue = (epoch: number) =>
      Effect.gen(function* () {
        if (queue === undefined && queueActiveAt(epoch, swav)) {
          queue = yield* makeQueue({
            length: swav.queueLength,
            batchSize,
            dim: config.model.out,
            cropsForAssign: swav.cropsForAssign,
          });
          hooks.onInfo?.(
            `epoch ${epoch + 1}: queue of ${queue.length} embeddings per assignment crop created`,
          );
        }
        return queue;
      });

    const trainingState = TrainingState.of({ model, variables, parts, optimiser, queue: () => queue });

    // Where we start: fresh, or from the latest checkpoint.
    let step = 0;
    let startEpoch = 0;
    let batchInEpoch = 0;
    if (options.resume) {
      const latest = yield* latestCheckpoint(runFolder);
      if (latest === undefined) {
        hooks.onWarning?.(`--resume: no checkpoint in ${runFolder}; starting from scratch`);
      } else {
        const checkpoint = yield* readCheckpoint(latest);
        loadModelArrays(model, checkpoint, latest);
        optimiser.restore(Object.fromEntries(
          checkpoint.arrays.filter((a) => a.name.startsWith("optimiser/")).map((a) => [
            a.name.slice("optimiser/".length),
            { shape: a.shape, values: a.values as Float32Array },
          ]),
        ));
        const savedQueue = checkpoint.extra["queue"] as
          | { length: number; batchSize: number; dim: number; cropsForAssign: number[]; filled: number }
          | undefined;
        if (savedQueue !== undefined) {
          const restoredQueue = yield* ensureQueue(Math.max(checkpoint.epoch, swav.queueStartEpoch));
          if (restoredQueue !== undefined) {
            yield* restoreQueue(restoredQueue, {
              ...savedQueue,
              embeddings: savedQueue.cropsForAssign.map((_, i) => {
                const array = checkpoint.arrays.find((a) => a.name === `queue/${i}`);
                if (array === undefined) throw new Error(`checkpoint ${latest} lacks queue/${i}`);
                return array.values as Float32Array;
              }),
            });
          }
        }
        step = checkpoint.step;
        startEpoch = checkpoint.epoch;
        batchInEpoch = checkpoint.batchInEpoch;
        hooks.onInfo?.(
          `resumed from ${latest} at step ${step} (epoch ${startEpoch + 1}, batch ${batchInEpoch})`,
        );
      }
    }

    yield* Effect.promise(() => Deno.mkdir(runFolder, { recursive: true }));
    yield* writeJson(`${runFolder}/config.json`, config);
    yield* writeJson(`${runFolder}/seed.json`, { seed: trainConfig.seed });
    const metricsFile = yield* Effect.acquireRelease(
      Effect.promise(() =>
        Deno.open(`${runFolder}/metrics.jsonl`, { append: true, create: true, write: true })
      ),
      (file) => Effect.sync(() => file.close()),
    );
    const encoder = new TextEncoder();

    const saveCheckpoint = (epoch: number, batchDone: number) =>
      Effect.gen(function* () {
        const slots = yield* Effect.promise(() => optimiser.serialise());
        const savedQueue = queue === undefined ? undefined : yield* serialiseQueue(queue);
        const arrays = [
          ...(yield* Effect.promise(() => modelArrays(model))),
          ...Object.entries(slots).map(([name, slot]) => ({
            name: `optimiser/${name}`,
            shape: [...slot.shape],
            values: slot.values,
          })),
          ...(savedQueue?.embeddings ?? []).map((values, i) => ({
            name: `queue/${i}`,
            shape: [savedQueue!.length, savedQueue!.dim],
            values,
          })),
        ];
        const path = yield* writeCheckpoint(runFolder, {
          step,
          epoch,
          batchInEpoch: batchDone,
          config,
          extra: {
            seed: trainConfig.seed,
            backend: backend.name,
            ...(savedQueue === undefined ? {} : {
              queue: {
                length: savedQueue.length,
                batchSize: savedQueue.batchSize,
                dim: savedQueue.dim,
                cropsForAssign: savedQueue.cropsForAssign,
                filled: savedQueue.filled,
              },
            }),
          },
          arrays,
        });
        yield* pruneCheckpoints(runFolder, trainConfig.keepCheckpoints);
        return path;
      });

    // kNN check on the labelled splits, when asked for.
    const knnSources = trainConfig.knnEvery > 0 && source.classes !== undefined
      ? {
        train: yield* openSource(
          yield* resolveSourceSpec(withSplit(config.data.source, "train")),
          config.data.channels === undefined ? {} : { channels: config.data.channels },
        ),
        test: yield* openSource(
          yield* resolveSourceSpec(config.data.testSource ?? withSplit(config.data.source, "test")),
          config.data.channels === undefined ? {} : { channels: config.data.channels },
        ),
      }
      : undefined;

    const logK = Math.log(config.model.prototypes);
    const reports: EpochReport[] = [];
    let lastLoss = Number.NaN;
    let lastCheckpoint: string | undefined;
    const totalSteps = trainConfig.maxSteps > 0
      ? Math.min(trainConfig.maxSteps, stepsPerEpoch * trainConfig.epochs)
      : stepsPerEpoch * trainConfig.epochs;
    const stopped = yield* Ref.make(false);

    for (let epoch = startEpoch; epoch < trainConfig.epochs; epoch++) {
      if (yield* Ref.get(stopped)) break;
      yield* ensureQueue(epoch);
      const epochStart = performance.now();
      const skip = epoch === startEpoch ? batchInEpoch : 0;
      let lossSum = 0;
      let lossCount = 0;
      let collapseWarned = false;
      let batchIndex = skip;
      yield* loader.epoch(epoch).pipe(
        Stream.drop(skip),
        // maxSteps caps the run: take exactly the steps left (a predicate would see chunks ahead of the steps).
        Stream.take(
          trainConfig.maxSteps === 0 ? Number.POSITIVE_INFINITY : Math.max(0, trainConfig.maxSteps - step),
        ),
        Stream.runForEach((batch) =>
          Effect.scoped(Effect.gen(function* () {
            const t0 = performance.now();
            const lr = learningRateAt(step, schedule);
            // The step, stage by stage (pipelines/swav_step.ts): collate, encode -> sinkhorn -> swappedLoss
            // in one tape, finite-loss guard, LARC-SGD, queue update, code statistics.
            const { loss, ...stats } = yield* trainStep({ batch, step, epoch, lr }).pipe(
              Effect.provideService(TrainingState, trainingState),
            );
            step += 1;
            batchIndex += 1;
            lastLoss = loss;
            lossSum += loss;
            lossCount += 1;
            const seconds = (performance.now() - t0) / 1000;
            const metrics: StepMetrics = {
              epoch: epoch + 1,
              step,
              loss,
              lr,
              images_per_s: batchSize / seconds,
              code_entropy: stats.codeEntropy,
              prototypes_in_use: stats.prototypesInUse,
            };
            yield* Effect.promise(() => metricsFile.write(encoder.encode(JSON.stringify(metrics) + "\n")));
            hooks.onStep?.(metrics, { stepInEpoch: batchIndex, stepsPerEpoch, totalSteps });
            if (!collapseWarned && step > swav.freezePrototypesIters + 20) {
              const stuck = Math.abs(loss - logK) < 0.02 * logK;
              const few = stats.prototypesInUse <= Math.max(1, Math.min(4, config.model.prototypes / 20));
              if (stuck || few) {
                collapseWarned = true;
                hooks.onWarning?.(
                  `training looks collapsed at step ${step}: ` +
                    (stuck ? `loss ${loss.toFixed(3)} is stuck near ln K = ${logK.toFixed(3)}` : "") +
                    (stuck && few ? "; " : "") +
                    (few ? `only ${stats.prototypesInUse} prototypes in use` : "") +
                    ". Remedies (SwAV reference notes): fewer prototypes (about 10x the classes), " +
                    "start the queue later (swav.queueStartEpoch) or not at all, a smaller swav.epsilon, a larger batch.",
                );
              }
            }
            if (trainConfig.checkpointEvery > 0 && step % trainConfig.checkpointEvery === 0) {
              lastCheckpoint = yield* saveCheckpoint(epoch, batchIndex);
            }
          }))
        ),
      );
      const finishedEpoch = batchIndex >= stepsPerEpoch;
      if (!finishedEpoch) {
        // Stopped by maxSteps: checkpoint where we are, so --resume continues from here.
        lastCheckpoint = yield* saveCheckpoint(epoch, batchIndex);
        yield* Ref.set(stopped, true);
      } else {
        lastCheckpoint = yield* saveCheckpoint(epoch + 1, 0);
      }
      let knn: number | undefined;
      if (finishedEpoch && knnSources !== undefined && (epoch + 1) % trainConfig.knnEvery === 0) {
        knn = yield* knnTop1(model, knnSources.train, knnSources.test, config);
      }
      const report: EpochReport = {
        epoch: epoch + 1,
        meanLoss: lossCount === 0 ? Number.NaN : lossSum / lossCount,
        seconds: (performance.now() - epochStart) / 1000,
        ...(knn === undefined ? {} : { knnTop1: knn }),
      };
      reports.push(report);
      hooks.onEpoch?.(report);
    }
    const skipped = yield* loader.skipped;
    if (skipped.count > 0) {
      hooks.onWarning?.(
        `${skipped.count} unreadable samples were skipped, e.g. ${
          skipped.examples.slice(0, 3).map((e) => `${e.path} (${e.reason})`).join("; ")
        }`,
      );
    }
    return {
      steps: step,
      epochs: reports.length === 0 ? startEpoch : reports.at(-1)!.epoch,
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
