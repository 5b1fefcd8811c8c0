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
 * the worker pool, and the run folder's lock (pipelines/run_folder.ts: taken
 * before anything is written there). Checkpoints are atomic; a non-finite loss
 * stops the run before the update, a non-finite weight or batch-norm statistic
 * before the step is checkpointed, so the last checkpoint stays good.
 */
import type * as tf from "@tensorflow/tfjs";
import { Effect, Ref, type Scope } from "effect";
import { type Communicator, currentCommunicator } from "../backend/communicator.ts";
import { TensorBackend } from "../backend/tensor_backend.ts";
import type { RunConfig } from "../config/config.ts";
import type { DecodeError } from "../data/image_codec.ts";
import type { LoaderError } from "../data/loader.ts";
import type { SourceError } from "../data/sources.ts";
import type { TorchCheckpointError } from "../data/torch_checkpoint.ts";
import { disposeModel, makeSwavModel, type ModelWeightsError, type SwavModel } from "../models/model.ts";
import type { TorchWeightsError } from "../models/torch_names.ts";
import type { CropLayoutError } from "../stages/crop_layout.ts";
import { checkFitsBackend, type ModelTooLarge } from "../stages/encode.ts";
import { larcOptions, makeLarcSgd } from "../stages/optimise.ts";
import {
  effectiveQueueLength,
  type EmbeddingQueue,
  makeQueue,
  queueActiveAt,
  type QueueError,
} from "../state/queue.ts";
import { type CheckpointMismatch, latestCheckpoint, restoreRun, type RunPosition } from "./checkpoint.ts";
import type { CheckpointError } from "./checkpoint_format.ts";
import { broadcastModel, type DataParallelError, localBatchSize, shardQueue } from "./data_parallel.ts";
import { ownRestoredBank } from "./data_parallel_methods.ts";
import type { BankTooSmall } from "./deepclusterv2.ts";
import { type RunContext, runEpochs, startProgress, warnSkipped } from "./epoch_loop.ts";
import { openEpochScoring } from "./epoch_scoring.ts";
import type { EvaluationInputError } from "./knn.ts";
import { type CustomMethod, methodState, methodTrainStep } from "./methods.ts";
import {
  lockRunFolder,
  openMetricsLog,
  type RunFolder,
  type RunFolderBusy,
  type RunFolderUnusable,
} from "./run_folder.ts";
import { checkEarlierRun, type ResumeWithForce, type RunFolderHoldsRun } from "./run_history.ts";
import { type RunRecordError, runRecords } from "./run_records.ts";
import { checkpointWriter, writeRunRecords } from "./run_writing.ts";
import { type SwavStages, swavStages } from "./swav_step.ts";
import { initFromWeightsFile, initNote } from "./torch_weights.ts";
import type { NonFiniteLoss, NonFiniteState } from "./train_step.ts";
import { type DatasetTooSmall, openTrainingData } from "./training_data.ts";
import type { NoTrainingBatch, PretrainHooks, PretrainResult } from "./pretrain_types.ts";

export { NonFiniteLoss, NonFiniteState } from "./swav_step.ts";
export { RunFolderBusy, RunFolderUnusable } from "./run_folder.ts";
export { ResumeWithForce, RunFolderHoldsRun } from "./run_history.ts";
export { DataParallelError } from "./data_parallel.ts";
export { DatasetTooSmall, withSplit } from "./training_data.ts";
// The rest of `PretrainError`'s members, for callers that match on them.
export { RunRecordError } from "./run_records.ts";
export { EvaluationInputError } from "./knn.ts";
export { QueueError } from "../state/queue.ts";
export { CheckpointMismatch } from "./checkpoint.ts";
export { TorchCheckpointError } from "../data/torch_checkpoint.ts";
export { TorchWeightsError } from "../models/torch_names.ts";
export { BankTooSmall } from "./deepclusterv2.ts";
export {
  type EpochReport,
  NoTrainingBatch,
  type PretrainHooks,
  type PretrainResult,
  type StepMetrics,
} from "./pretrain_types.ts";

/**
 * The embedding queue, created at swav.queueStartEpoch (or on resume); the run's
 * scope disposes it. With several ranks each holds `queueLength / size` rows of
 * its own samples, as the reference does (the length first rounded down to a
 * multiple of the global batch).
 */
const queueKeeper = (config: RunConfig, hooks: PretrainHooks, comm: Communicator) => {
  let queue: EmbeddingQueue | undefined;
  const { swav } = config;
  return {
    current: () => queue,
    ensure: (epoch: number) =>
      Effect.gen(function* () {
        if (queue === undefined && queueActiveAt(epoch, swav)) {
          queue = yield* makeQueue({
            length: effectiveQueueLength(swav.queueLength, config.train.batchSize) / comm.size,
            batchSize: config.train.batchSize / comm.size,
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

/** Named trainable variables of a model, keyed by parameter name. */
const trainableByName = (model: SwavModel): Record<string, tf.Variable> =>
  Object.fromEntries(model.params.filter((p) => p.trainable).map((p) => [p.name, p.variable]));

/** A model whose variables the scope disposes. */
export const scopedModel = (config: SwavModel["config"], seed: number) =>
  Effect.acquireRelease(
    Effect.sync(() => makeSwavModel(config, seed)),
    (model) => Effect.sync(() => disposeModel(model)),
  );

/** How `pretrain` runs: resume or start afresh, initial weights, callbacks, and replaced stages or a whole custom method. */
export interface PretrainOptions {
  /** Continue from the latest checkpoint in the run folder. */
  readonly resume?: boolean;
  /** A fresh run into a folder holding a run moves that run into `previous-N` (pipelines/run_history.ts). */
  readonly force?: boolean;
  /** A fresh run starts from these weights (a PyTorch checkpoint: pipelines/torch_weights.ts). */
  readonly init?: string;
  /** Callbacks for progress, warnings and information. */
  readonly hooks?: PretrainHooks;
  /** Replaces stages of the SwAV step by stage values of the same types: a custom pipeline. */
  readonly stages?: Partial<SwavStages>;
  /** A user's own method (a `Method` value) instead of train.method's (examples/custom_method.ts). */
  readonly method?: CustomMethod;
}

/**
 * Everything `pretrain` can fail with: the run folder's, the data's, the model's and checkpoints'
 * errors, the step's, and an epoch that gave no batch.
 */
export type PretrainError =
  | RunFolderBusy
  | RunFolderUnusable
  | RunFolderHoldsRun
  | ResumeWithForce
  | RunRecordError
  | DataParallelError
  | SourceError
  | DecodeError
  | LoaderError
  | DatasetTooSmall
  | EvaluationInputError
  | CropLayoutError
  | ModelTooLarge
  | ModelWeightsError
  | QueueError
  | CheckpointError
  | CheckpointMismatch
  | TorchCheckpointError
  | TorchWeightsError
  | BankTooSmall
  | NonFiniteLoss
  | NonFiniteState
  | NoTrainingBatch;

/**
 * The run folder, rank 0's until the scope closes (nothing is written into it before the lock, and
 * other ranks write nothing there), and the earlier run in it: refused, or (--force) moved aside once
 * the start-up checks pass.
 */
const openRunFolder = (runFolder: string, options: PretrainOptions, comm: Communicator) =>
  Effect.gen(function* () {
    const folder = comm.rank === 0 ? yield* lockRunFolder(runFolder) : undefined;
    const earlier = folder === undefined ? undefined : yield* checkEarlierRun(folder, options);
    return { folder, earlier };
  });

/** The run config as recorded: the precision the kernels run with (a resolved `auto`) in place of the one asked for. */
const withRunPrecision = (
  config: RunConfig,
  precision: RunConfig["train"]["precision"],
  hooks: PretrainHooks,
) => {
  hooks.onInfo?.(
    precision === "bf16"
      ? "precision bf16: convolutions in bfloat16 (fp32 accumulation, weights, statistics and losses)"
      : "precision fp32",
  );
  return { ...config, train: { ...config.train, precision } };
};

/**
 * State owned by the run's scope: the model, the optimiser, the queue (created at queueStartEpoch or
 * on resume) and DeepCluster-v2's memory bank; the method's step over them, and the checkpoint writer.
 */
const openTraining = (
  config: RunConfig,
  options: PretrainOptions,
  data: { readonly samples: number; readonly batchSize: number; readonly stepsPerEpoch: number },
  folder: RunFolder | undefined,
  backend: TensorBackend["Service"],
  comm: Communicator,
) =>
  Effect.gen(function* () {
    const { batchSize } = data;
    yield* checkFitsBackend(config.model, batchSize, config.multicrop, backend.name);
    const model = yield* scopedModel(config.model, config.train.seed);
    const optimiser = yield* makeLarcSgd(larcOptions(config.optim));
    const queues = queueKeeper(config, options.hooks ?? {}, comm);
    const state = { model, variables: trainableByName(model), optimiser, queue: queues.current };
    // DeepCluster-v2's memory bank (by sample id over the whole source); none for the other methods.
    const memoryBank = methodState(config, data.samples);
    const trainStep = yield* methodTrainStep(
      config,
      state,
      { batchSize, itersPerEpoch: data.stepsPerEpoch },
      { ...swavStages, ...options.stages },
      memoryBank,
      comm,
      options.method,
    );
    const { seed, keepCheckpoints } = config.train;
    const save = checkpointWriter(folder, keepCheckpoints, () => ({
      ...state,
      queue: queues.current(),
      config,
      seed,
      backend: backend.name,
      method: config.train.method,
      memoryBank,
    }), comm);
    return { model, optimiser, queues, memoryBank, trainStep, save };
  });

/** Where the run starts: the latest checkpoint on resume, else afresh (from `options.init`'s weights if given). */
const restoreOrInit = (
  config: RunConfig,
  options: PretrainOptions,
  training: Effect.Success<ReturnType<typeof openTraining>>,
  comm: Communicator,
) =>
  Effect.gen(function* () {
    const hooks = options.hooks ?? {};
    const runFolder = config.train.out;
    const { model, memoryBank } = training;
    const latest = options.resume ? yield* latestCheckpoint(runFolder) : undefined;
    if (options.resume && latest === undefined) {
      hooks.onWarning?.(`--resume: no checkpoint in ${runFolder}; starting from scratch`);
    }
    const start: RunPosition = latest === undefined
      ? { step: 0, epoch: 0, batchInEpoch: 0 }
      : yield* restoreRun(latest, {
        model,
        optimiser: training.optimiser,
        queueStartEpoch: config.swav.queueStartEpoch,
        queueFor: training.queues.ensure,
        onWarning: hooks.onWarning,
        memoryBank,
        queueShard: (saved) => shardQueue(saved, comm),
      });
    // The checkpoint's bank is whole on every rank: each keeps its share of the present samples.
    if (latest !== undefined && memoryBank !== undefined) ownRestoredBank(memoryBank, comm);
    const resumedAt = `step ${start.step} (epoch ${start.epoch + 1}, batch ${start.batchInEpoch})`;
    if (latest !== undefined) {
      hooks.onInfo?.(`resumed from ${"path" in start ? start.path : latest} at ${resumedAt}`);
    } else if (options.init !== undefined) {
      hooks.onInfo?.(initNote(options.init, yield* initFromWeightsFile(model, options.init)));
    }
    return start;
  });

/** Start-up checks passed: only now does anything in the run folder change (the earlier run moved, the run's records). */
const startRunFolder = (
  opened: Effect.Success<ReturnType<typeof openRunFolder>>,
  runConfig: RunConfig,
  backendName: TensorBackend["Service"]["name"],
  hooks: PretrainHooks,
) =>
  Effect.gen(function* () {
    const { folder, earlier } = opened;
    if (folder === undefined || earlier === undefined) return;
    const movedTo = yield* earlier.moveAside;
    if (movedTo !== undefined) {
      hooks.onInfo?.(`the earlier run in ${runConfig.train.out} was moved into ${movedTo}`);
    }
    yield* writeRunRecords(folder, runConfig, backendName);
  });

/** The run's logs (rank 0's): metrics.jsonl (on resume, steps after the checkpoint dropped: they run again), epochs and events. */
const openRunLogs = (
  folder: RunFolder | undefined,
  runFolder: string,
  resumeAt: number | undefined,
): Effect.Effect<Pick<RunContext, "writeMetrics" | "records">, RunFolderUnusable, Scope.Scope> =>
  Effect.gen(function* () {
    if (folder === undefined) {
      return {
        writeMetrics: () => Effect.void,
        records: { epoch: () => Effect.void, event: () => Effect.void },
      };
    }
    return { writeMetrics: yield* openMetricsLog(folder, resumeAt), records: runRecords(runFolder) };
  });

/**
 * Pretrains a SwAV model as `config` says. With `resume`, continues exactly
 * from the latest checkpoint in the run folder.
 *
 * @example Pretrain a tiny model for one epoch on a tiny generated data set
 * ```ts
 * import { Effect } from "effect";
 * import assert from "node:assert/strict";
 * import { decodeRunConfig, pretrain, TensorBackend, writeDemoDataset } from "@swav/swav-ts";
 *
 * const data = await Deno.makeTempDir();
 * const out = await Deno.makeTempDir();
 * await writeDemoDataset({ folder: data, perClassTrain: 4, perClassTest: 2, size: 16, seed: 1 });
 * const result = await Effect.runPromise(Effect.gen(function* () {
 *   const config = yield* decodeRunConfig({
 *     data: { source: `${data}:train` },
 *     multicrop: { nmbCrops: [2, 2], sizeCrops: [16, 8], minScaleCrops: [0.3, 0.1], maxScaleCrops: [1, 0.3] },
 *     model: { arch: "resnet18", width: 4, stem: "cifar", hidden: 32, out: 16, prototypes: 20 },
 *     swav: { queueLength: 0 },
 *     train: { epochs: 1, batchSize: 8, out, knnEvery: 0 },
 *   });
 *   return yield* pretrain(config, { hooks: { onEpoch: (report) => console.log(report.epoch, report.meanLoss) } });
 * }).pipe(Effect.provide(TensorBackend.layer("wasm"))));
 * assert.equal(result.steps, 5); // 40 images in batches of 8
 * assert.ok(Number.isFinite(result.lastLoss));
 * assert.ok(result.checkpoint !== undefined); // a checkpoint to resume or evaluate from, in the run folder
 * await Deno.remove(data, { recursive: true });
 * await Deno.remove(out, { recursive: true });
 * ```
 */
export const pretrain = (
  config: RunConfig,
  options: PretrainOptions = {},
): Effect.Effect<PretrainResult, PretrainError, TensorBackend> =>
  Effect.scoped(Effect.gen(function* () {
    const hooks = options.hooks ?? {};
    const backend = yield* TensorBackend;
    const { train: trainConfig } = config;
    // Data parallel: each of `size` ranks takes `batchSize / size` samples of every global batch.
    const comm = yield* currentCommunicator;
    const batchSize = yield* localBatchSize(trainConfig.batchSize, comm.size);
    const opened = yield* openRunFolder(trainConfig.out, options, comm);
    const runConfig = withRunPrecision(config, backend.settings.precision, hooks);

    // Data: source -> decode -> multicrop, in a Worker pool, batched.
    const { source, loader } = yield* openTrainingData(config, batchSize, comm);
    const stepsPerEpoch = loader.batchesPerEpoch;
    const training = yield* openTraining(
      config,
      options,
      { samples: source.length, batchSize, stepsPerEpoch },
      opened.folder,
      backend,
      comm,
    );
    const start = yield* restoreOrInit(config, options, training, comm);
    yield* startRunFolder(opened, runConfig, backend.name, hooks);
    // Every rank starts from rank 0's weights (equal by seed already; this also covers --init files).
    yield* Effect.promise(() => broadcastModel(training.model, comm));

    const logs = yield* openRunLogs(opened.folder, trainConfig.out, options.resume ? start.step : undefined);
    const scoring = yield* openEpochScoring(config, training.model, source, comm);
    const { maxSteps, epochs } = trainConfig;
    const loop = {
      ...logs,
      ...training,
      config,
      hooks,
      progress: yield* startProgress(start.step),
      stepsPerEpoch,
      totalSteps: maxSteps > 0 ? Math.min(maxSteps, stepsPerEpoch * epochs) : stepsPerEpoch * epochs,
      start,
      folder: opened.folder,
      loader,
      samples: source.length,
      ensureQueue: training.queues.ensure,
      scoring,
      comm,
    };
    const { reports, runSkips } = yield* runEpochs(loop);

    const skipped = runSkips ?? (yield* loader.skipped);
    if (comm.rank === 0) yield* warnSkipped(loop, skipped);
    const { step, lastLoss, lastCheckpoint } = yield* Ref.get(loop.progress);
    return {
      steps: step,
      epochs: reports.length === 0 ? start.epoch : reports.at(-1)!.epoch,
      lastLoss,
      epochReports: reports,
      runFolder: trainConfig.out,
      checkpoint: lastCheckpoint,
      skippedSamples: skipped.count,
    } satisfies PretrainResult;
  }));
