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
import { Effect, Ref, Stream } from "effect";
import { activeCommunicator, type Communicator } from "../backend/communicator.ts";
import { TensorBackend } from "../backend/tensor_backend.ts";
import type { RunConfig } from "../config/config.ts";
import type { SkipReport } from "../data/loader.ts";
import { disposeModel, makeSwavModel, type SwavModel } from "../models/model.ts";
import { checkFitsBackend } from "../stages/encode.ts";
import { larcOptions, makeLarcSgd } from "../stages/optimise.ts";
import { effectiveQueueLength, type EmbeddingQueue, makeQueue, queueActiveAt } from "../state/queue.ts";
import { latestCheckpoint, restoreRun, type RunPosition } from "./checkpoint.ts";
import {
  broadcastModel,
  everyRankHasBatch,
  gatherSkipReports,
  localBatchSize,
  shardQueue,
} from "./data_parallel.ts";
import { ownRestoredBank } from "./data_parallel_methods.ts";
import { lockRunFolder, openMetricsLog, type RunFolderUnusable, writeJsonLines } from "./run_folder.ts";
import { runRecords } from "./run_records.ts";
import { checkEarlierRun } from "./run_history.ts";
import { type SwavStages, swavStages } from "./swav_step.ts";
import {
  type CustomMethod,
  methodCollapseWarning,
  type MethodEpochTimes,
  methodState,
  methodTrainStep,
  startMethodEpoch,
} from "./methods.ts";
import type { StepOutcome } from "./train_step.ts";
import { initFromWeightsFile, initNote } from "./torch_weights.ts";
import { plural } from "./wording.ts";
import { openEpochScoring, scoreEpoch, trainProbe } from "./epoch_scoring.ts";
import { checkpointWriter, writeRunRecords } from "./run_writing.ts";
import { openTrainingData } from "./training_data.ts";
import {
  type EpochReport,
  NoTrainingBatch,
  type PretrainHooks,
  type PretrainResult,
  type StepMetrics,
} from "./pretrain_types.ts";

export { NonFiniteLoss, NonFiniteState } from "./swav_step.ts";
export { RunFolderBusy, RunFolderUnusable } from "./run_folder.ts";
export { ResumeWithForce, RunFolderHoldsRun } from "./run_history.ts";
export { DataParallelError } from "./data_parallel.ts";
export { DatasetTooSmall, withSplit } from "./training_data.ts";
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

/** Each skipped sample once (a sample unreadable in one epoch is skipped again in the next), in order. */
const eachSampleOnce = (
  samples: readonly { path: string; reason: string }[],
) => [
  ...new Map(samples.map((s) => [`${s.path}\n${s.reason}`, { path: s.path, reason: s.reason }])).values(),
];

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
  /** The epoch's stream ended by itself (not cut by maxSteps): the epoch is done, however many were skipped. */
  readonly epochEnded: boolean;
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
  epochEnded: false,
});

/** What the loop hands to the per-step and per-epoch bookkeeping. */
interface RunContext {
  readonly config: RunConfig;
  readonly hooks: PretrainHooks;
  readonly progress: Ref.Ref<Progress>;
  readonly records: ReturnType<typeof runRecords>;
  readonly writeMetrics: (row: StepMetrics) => Effect.Effect<void, RunFolderUnusable>;
  readonly save: ReturnType<typeof checkpointWriter>;
  readonly stepsPerEpoch: number;
  readonly totalSteps: number;
}

/** After a step: count it, write its metrics line, report progress, check for collapse, checkpoint if due. */
const afterTrainStep = (
  run: RunContext,
  epoch: number,
  outcome: StepOutcome,
  seconds: number,
) =>
  Effect.gen(function* () {
    const { config, hooks, progress } = run;
    let p = yield* Ref.updateAndGet(progress, (p) => afterStep(p, outcome.loss));
    const metrics: StepMetrics = {
      epoch: epoch + 1,
      step: p.step,
      loss: outcome.loss,
      lr: outcome.lr,
      images_per_s: config.train.batchSize / seconds,
      ...(outcome.codeEntropy === undefined ? {} : { code_entropy: outcome.codeEntropy }),
      ...(outcome.prototypesInUse === undefined ? {} : { prototypes_in_use: outcome.prototypesInUse }),
      ...(outcome.embeddingStd === undefined ? {} : { embedding_std: outcome.embeddingStd }),
    };
    yield* run.writeMetrics(metrics);
    hooks.onStep?.(metrics, {
      stepInEpoch: p.batchInEpoch,
      stepsPerEpoch: run.stepsPerEpoch,
      totalSteps: run.totalSteps,
    });
    const collapse = p.collapseWarned ? undefined : methodCollapseWarning(config, p.step, outcome);
    if (collapse !== undefined) {
      p = yield* Ref.updateAndGet(progress, (p) => ({ ...p, collapseWarned: true }));
      hooks.onWarning?.(collapse);
      yield* run.records.event(p.step, "collapse", collapse);
    }
    const every = config.train.checkpointEvery;
    if (every > 0 && p.step % every === 0) {
      const path = yield* run.save({ step: p.step, epoch, batchInEpoch: p.batchInEpoch });
      yield* Ref.update(progress, (p) => ({ ...p, lastCheckpoint: path }));
    }
  });

/** The epoch's report, told to the hooks and kept in epochs.jsonl. */
const reportEpoch = (
  run: RunContext,
  epoch: number,
  p: Progress,
  elapsedMs: number,
  knn: number | undefined,
  probe?: number | undefined,
  method?: MethodEpochTimes | undefined,
) =>
  Effect.gen(function* () {
    const report: EpochReport = {
      epoch: epoch + 1,
      meanLoss: p.lossCount === 0 ? Number.NaN : p.lossSum / p.lossCount,
      seconds: elapsedMs / 1000,
      ...(knn === undefined ? {} : { knnTop1: knn }),
      ...(probe === undefined ? {} : { onlineProbeTop1: probe }),
      ...method,
    };
    run.hooks.onEpoch?.(report);
    yield* run.records.epoch(report);
    return report;
  });

/** One warning for the run's skipped samples (the loader names each one as it goes), also in events.jsonl. */
const warnSkipped = (run: RunContext, skipped: { readonly count: number }) =>
  Effect.gen(function* () {
    if (skipped.count === 0) return;
    const text =
      `${plural(skipped.count, "unreadable sample")} ${skipped.count === 1 ? "was" : "were"} skipped ` +
      "(each named above; all listed in skipped.jsonl)";
    run.hooks.onWarning?.(text);
    yield* run.records.event((yield* Ref.get(run.progress)).step, "skipped", text);
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
): Effect.Effect<PretrainResult, unknown, TensorBackend> =>
  Effect.scoped(Effect.gen(function* () {
    const hooks = options.hooks ?? {};
    const backend = yield* TensorBackend;
    const { train: trainConfig, swav } = config;
    const { out: runFolder } = trainConfig;
    // Data parallel: each of `size` ranks takes `batchSize / size` samples of every global batch.
    const comm = activeCommunicator();
    const batchSize = yield* localBatchSize(trainConfig.batchSize, comm.size);
    // The run folder is rank 0's until the scope closes; nothing is written into it before the lock,
    // and other ranks write nothing there.
    const folder = comm.rank === 0 ? yield* lockRunFolder(runFolder) : undefined;
    // An earlier run there is refused, or (--force) moved aside once the start-up checks below pass.
    const earlier = folder === undefined ? undefined : yield* checkEarlierRun(folder, options);
    // The precision the kernels run with (a resolved `auto`), recorded in place of the one asked for.
    const precision = backend.settings.precision;
    const runConfig = { ...config, train: { ...config.train, precision } };
    hooks.onInfo?.(
      precision === "bf16"
        ? "precision bf16: convolutions in bfloat16 (fp32 accumulation, weights, statistics and losses)"
        : "precision fp32",
    );

    // Data: source -> decode -> multicrop, in a Worker pool, batched.
    const { source, loader } = yield* openTrainingData(config, batchSize, comm);
    const stepsPerEpoch = loader.batchesPerEpoch;

    // State owned by this scope: model, optimiser, and the queue (created at queueStartEpoch or on resume).
    yield* checkFitsBackend(config.model, batchSize, config.multicrop, backend.name);
    const model = yield* scopedModel(config.model, trainConfig.seed);
    const optimiser = yield* makeLarcSgd(larcOptions(config.optim));
    const queues = queueKeeper(config, hooks, comm);
    const state = { model, variables: trainableByName(model), optimiser, queue: queues.current };
    // DeepCluster-v2's memory bank (by sample id over the whole source); none for the other methods.
    const memoryBank = methodState(config, source.length);
    const trainStep = yield* methodTrainStep(
      config,
      state,
      { batchSize, itersPerEpoch: stepsPerEpoch },
      { ...swavStages, ...options.stages },
      memoryBank,
      comm,
      options.method,
    );
    const { seed, keepCheckpoints } = trainConfig;
    const save = checkpointWriter(folder, keepCheckpoints, () => ({
      ...state,
      queue: queues.current(),
      config,
      seed,
      backend: backend.name,
      method: config.train.method,
      memoryBank,
    }), comm);

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
        onWarning: hooks.onWarning,
        memoryBank,
        ...(comm.size > 1 ? { queueShard: (saved) => shardQueue(saved, comm) } : {}),
      });
    // The checkpoint's bank is whole on every rank: each keeps its share of the present samples.
    if (latest !== undefined && memoryBank !== undefined) ownRestoredBank(memoryBank, comm);
    const resumedAt = `step ${start.step} (epoch ${start.epoch + 1}, batch ${start.batchInEpoch})`;
    if (latest !== undefined) {
      hooks.onInfo?.(`resumed from ${"path" in start ? start.path : latest} at ${resumedAt}`);
    } else if (options.init !== undefined) {
      hooks.onInfo?.(initNote(options.init, yield* initFromWeightsFile(model, options.init)));
    }
    // Start-up checks passed: only now does anything in the run folder change.
    if (folder !== undefined) {
      const movedTo = yield* earlier!.moveAside;
      if (movedTo !== undefined) hooks.onInfo?.(`the earlier run in ${runFolder} was moved into ${movedTo}`);
      yield* writeRunRecords(folder, runConfig, backend.name);
    }
    // Every rank starts from rank 0's weights (equal by seed already; this also covers --init files).
    if (comm.size > 1) yield* Effect.promise(() => broadcastModel(model, comm));

    // On resume, metrics of steps after the checkpoint are dropped: they are about to be run again.
    const writeMetrics = folder === undefined
      ? () => Effect.void
      : yield* openMetricsLog(folder, options.resume ? start.step : undefined);
    const records = folder === undefined
      ? { epoch: () => Effect.void, event: () => Effect.void }
      : runRecords(runFolder);
    const { knnSources, probe } = yield* openEpochScoring(config, model, source, comm);
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
    const run: RunContext = {
      config,
      hooks,
      progress,
      records,
      writeMetrics,
      save,
      stepsPerEpoch,
      totalSteps,
    };

    // The whole job's skip report as of the last epoch end: rank 0's holds every rank's.
    let runSkips: SkipReport | undefined;
    for (let epoch = start.epoch; epoch < trainConfig.epochs; epoch++) {
      if ((yield* Ref.get(progress)).stopped) break;
      yield* queues.ensure(epoch);
      const epochStart = performance.now();
      const skip = epoch === start.epoch ? start.batchInEpoch : 0;
      const before = yield* Ref.updateAndGet(progress, (p) => newEpoch(p, skip));
      // The method's epoch start (DeepCluster-v2: the bank's first fill, then the epoch's k-means).
      // Told through onInfo (it may take minutes), its seconds kept in the epoch's record.
      const told = { onInfo: hooks.onInfo, batchesPerEpoch: stepsPerEpoch };
      const methodTimes = yield* startMethodEpoch(
        config,
        model,
        memoryBank,
        epoch,
        skip,
        () => loader.epoch(epoch),
        comm,
        told,
      );
      // With several ranks each step starts by agreeing that every rank has a batch: one that skipped
      // unreadable samples may run out first, and the others then end the epoch with it.
      const agreement = { ended: false };
      const batches = loader.epoch(epoch).pipe(Stream.drop(skip));
      yield* (comm.size > 1 ? Stream.concat(batches, Stream.make(undefined)) : batches).pipe(
        Stream.onEnd(Ref.update(progress, (p) => ({ ...p, epochEnded: true }))),
        // maxSteps caps the run: take exactly the steps left (a predicate would see chunks ahead of the steps).
        Stream.take(
          trainConfig.maxSteps === 0
            ? Number.POSITIVE_INFINITY
            : Math.max(0, trainConfig.maxSteps - before.step),
        ),
        Stream.runForEach((batch) =>
          Effect.scoped(Effect.gen(function* () {
            if (agreement.ended) return;
            if (comm.size > 1 && !everyRankHasBatch(batch !== undefined, comm)) agreement.ended = true;
            if (batch === undefined || agreement.ended) return;
            const t0 = performance.now();
            // The step, stage by stage (pipelines/swav_step.ts).
            const outcome = yield* trainStep({ batch, step: (yield* Ref.get(progress)).step, epoch });
            if (probe !== undefined && outcome.features !== undefined) {
              trainProbe(probe.probe, outcome.features, batch.labels);
            }
            yield* afterTrainStep(run, epoch, outcome, (performance.now() - t0) / 1000);
          }))
        ),
      );
      const p = yield* Ref.get(progress);
      // Every rank's skips, so that rank 0's skipped.jsonl and summary cover the whole data set.
      const local = yield* loader.skipped;
      runSkips = comm.size > 1 ? gatherSkipReports(local, comm) : local;
      if (folder !== undefined && runSkips !== undefined) {
        yield* writeJsonLines(folder, "skipped.jsonl", eachSampleOnce(runSkips.samples));
      }
      // A whole epoch without one batch (every sample unreadable, or too few readable) trains nothing:
      // a failure, not a "done" with an untrained checkpoint.
      const stepsLeft = trainConfig.maxSteps === 0 || before.step < trainConfig.maxSteps;
      if (p.epochEnded && skip === 0 && p.step === before.step && stepsLeft) {
        return yield* new NoTrainingBatch({
          epoch: epoch + 1,
          batchSize: trainConfig.batchSize,
          samples: source.length,
          skipped: (runSkips ?? local).count,
        });
      }
      // Stopped by maxSteps: checkpoint where we are, so --resume continues from here.
      const path = yield* save(
        p.epochEnded
          ? { step: p.step, epoch: epoch + 1, batchInEpoch: 0 }
          : { step: p.step, epoch, batchInEpoch: p.batchInEpoch },
      );
      yield* Ref.set(progress, { ...p, lastCheckpoint: path, stopped: !p.epochEnded });
      const { knn, probeTop1 } = p.epochEnded
        ? yield* scoreEpoch(config, model, epoch, knnSources, probe)
        : { knn: undefined, probeTop1: undefined };
      reports.push(
        yield* reportEpoch(run, epoch, p, performance.now() - epochStart, knn, probeTop1, methodTimes),
      );
    }
    const skipped = runSkips ?? (yield* loader.skipped);
    if (comm.rank === 0) yield* warnSkipped(run, skipped);
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
