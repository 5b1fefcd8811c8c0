/**
 * The pretraining run's epoch loop: per epoch, the method's epoch start, the
 * steps over the loader's batches (each counted, logged, checked for collapse
 * and checkpointed when due), the epoch's skip report, its checkpoint, its
 * scores and its report. The run's counters live in one `Ref` of `Progress`,
 * folded per step and reset per epoch.
 */
import { Effect, Ref, type Scope, Stream } from "effect";
import type { Communicator } from "../backend/communicator.ts";
import type { TensorBackend } from "../backend/tensor_backend.ts";
import type { RunConfig } from "../config/config.ts";
import type { Loader, SkipReport } from "../data/loader.ts";
import type { SwavModel } from "../models/model.ts";
import type { MemoryBank } from "../state/memory_bank.ts";
import type { RunPosition } from "./checkpoint.ts";
import { batchesOverRanks, gatherSkipReports } from "./data_parallel.ts";
import { type openEpochScoring, scoreEpoch, trainProbe } from "./epoch_scoring.ts";
import { methodCollapseWarning, type MethodEpochTimes, startMethodEpoch } from "./methods.ts";
import { type RunFolder, type RunFolderUnusable, writeJsonLines } from "./run_folder.ts";
import type { runRecords } from "./run_records.ts";
import type { checkpointWriter } from "./run_writing.ts";
import type { StepInput, StepOutcome } from "./train_step.ts";
import { plural } from "./wording.ts";
import { type EpochReport, NoTrainingBatch, type PretrainHooks, type StepMetrics } from "./pretrain_types.ts";

/** The run's counters, folded per step (and reset per epoch), never mutated in place. */
export interface Progress {
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

/** The counters of a run starting (or resuming) at `step`. */
export const startProgress = (step: number): Effect.Effect<Ref.Ref<Progress>> =>
  Ref.make<Progress>({
    ...newEpoch({} as Progress, 0),
    step,
    lastLoss: Number.NaN,
    lastCheckpoint: undefined,
    stopped: false,
  });

/** What the loop hands to the per-step and per-epoch bookkeeping. */
export interface RunContext {
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
export const warnSkipped = (run: RunContext, skipped: { readonly count: number }) =>
  Effect.gen(function* () {
    if (skipped.count === 0) return;
    const text =
      `${plural(skipped.count, "unreadable sample")} ${skipped.count === 1 ? "was" : "were"} skipped ` +
      "(each named above; all listed in skipped.jsonl)";
    run.hooks.onWarning?.(text);
    yield* run.records.event((yield* Ref.get(run.progress)).step, "skipped", text);
  });

/** Each skipped sample once (a sample unreadable in one epoch is skipped again in the next), in order. */
const eachSampleOnce = (
  samples: readonly { path: string; reason: string }[],
) => [
  ...new Map(samples.map((s) => [`${s.path}\n${s.reason}`, { path: s.path, reason: s.reason }])).values(),
];

/** What the epoch loop runs: the run's bookkeeping, its data, its state, its step and its epoch scoring. */
export interface EpochLoop<E, Q> extends RunContext {
  /** Where the run starts (fresh, or the restored checkpoint's position). */
  readonly start: RunPosition;
  /** Rank 0's locked run folder; undefined on the other ranks. */
  readonly folder: RunFolder | undefined;
  readonly loader: Loader;
  /** Samples in the training source (for the no-batch error). */
  readonly samples: number;
  readonly model: SwavModel;
  /** DeepCluster-v2's memory bank; undefined for the other methods. */
  readonly memoryBank: MemoryBank | undefined;
  /** Creates the embedding queue when the epoch says so. */
  readonly ensureQueue: (epoch: number) => Effect.Effect<unknown, Q, Scope.Scope>;
  /** The method's training step (pipelines/train_step.ts). */
  readonly trainStep: (input: StepInput) => Effect.Effect<StepOutcome, E, Scope.Scope | TensorBackend>;
  readonly scoring: Effect.Success<ReturnType<typeof openEpochScoring>>;
  readonly comm: Communicator;
}

/** What the loop leaves: the epochs' reports and the whole job's skip report as of the last epoch end. */
export interface EpochsDone {
  readonly reports: readonly EpochReport[];
  readonly runSkips: SkipReport | undefined;
}

/**
 * One epoch: the method's epoch start, its steps (from `skip` batches in, on resume), its skip report,
 * its checkpoint, its scores and its report; undefined when the run was stopped (by maxSteps) before it.
 */
const runEpoch = <E, Q>(loop: EpochLoop<E, Q>, epoch: number) =>
  Effect.gen(function* () {
    const { config, progress, loader, comm, start } = loop;
    const { probe } = loop.scoring;
    const trainConfig = config.train;
    yield* loop.ensureQueue(epoch);
    const epochStart = performance.now();
    const skip = epoch === start.epoch ? start.batchInEpoch : 0;
    const before = yield* Ref.updateAndGet(progress, (p) => newEpoch(p, skip));
    // The method's epoch start (DeepCluster-v2: the bank's first fill, then the epoch's k-means).
    // Told through onInfo (it may take minutes), its seconds kept in the epoch's record.
    const told = { onInfo: loop.hooks.onInfo, batchesPerEpoch: loop.stepsPerEpoch };
    const methodTimes = yield* startMethodEpoch(
      config,
      loop.model,
      loop.memoryBank,
      epoch,
      skip,
      () => loader.epoch(epoch),
      comm,
      told,
    );
    // With several ranks each step starts by agreeing that every rank has a batch: one that skipped
    // unreadable samples may run out first, and the others then end the epoch with it.
    const batches = batchesOverRanks(loader.epoch(epoch).pipe(Stream.drop(skip)), comm);
    yield* batches.stream.pipe(
      Stream.onEnd(Ref.update(progress, (p) => ({ ...p, epochEnded: true }))),
      // maxSteps caps the run: take exactly the steps left (a predicate would see chunks ahead of the steps).
      Stream.take(
        trainConfig.maxSteps === 0
          ? Number.POSITIVE_INFINITY
          : Math.max(0, trainConfig.maxSteps - before.step),
      ),
      Stream.runForEach((batch) =>
        Effect.scoped(Effect.gen(function* () {
          if (!batches.proceed(batch)) return;
          const t0 = performance.now();
          // The step, stage by stage (pipelines/swav_step.ts).
          const outcome = yield* loop.trainStep({ batch, step: (yield* Ref.get(progress)).step, epoch });
          if (probe !== undefined && outcome.features !== undefined) {
            trainProbe(probe.probe, outcome.features, batch.labels);
          }
          yield* afterTrainStep(loop, epoch, outcome, (performance.now() - t0) / 1000);
        }))
      ),
    );
    const p = yield* Ref.get(progress);
    // Every rank's skips, so that rank 0's skipped.jsonl and summary cover the whole data set.
    const local = yield* loader.skipped;
    const runSkips = gatherSkipReports(local, comm);
    if (loop.folder !== undefined && runSkips !== undefined) {
      yield* writeJsonLines(loop.folder, "skipped.jsonl", eachSampleOnce(runSkips.samples));
    }
    // A whole epoch without one batch (every sample unreadable, or too few readable) trains nothing:
    // a failure, not a "done" with an untrained checkpoint.
    const stepsLeft = trainConfig.maxSteps === 0 || before.step < trainConfig.maxSteps;
    if (p.epochEnded && skip === 0 && p.step === before.step && stepsLeft) {
      return yield* new NoTrainingBatch({
        epoch: epoch + 1,
        batchSize: trainConfig.batchSize,
        samples: loop.samples,
        skipped: (runSkips ?? local).count,
      });
    }
    // Stopped by maxSteps: checkpoint where we are, so --resume continues from here.
    const path = yield* loop.save(
      p.epochEnded
        ? { step: p.step, epoch: epoch + 1, batchInEpoch: 0 }
        : { step: p.step, epoch, batchInEpoch: p.batchInEpoch },
    );
    yield* Ref.set(progress, { ...p, lastCheckpoint: path, stopped: !p.epochEnded });
    const { knn, probeTop1 } = p.epochEnded
      ? yield* scoreEpoch(config, loop.model, epoch, loop.scoring.knnSources, probe)
      : { knn: undefined, probeTop1: undefined };
    const report = yield* reportEpoch(
      loop,
      epoch,
      p,
      performance.now() - epochStart,
      knn,
      probeTop1,
      methodTimes,
    );
    return { report, runSkips };
  });

/** The epochs from the start position to train.epochs, until maxSteps stops the run. */
export const runEpochs = <E, Q>(loop: EpochLoop<E, Q>) =>
  Effect.gen(function* () {
    const reports: EpochReport[] = [];
    let runSkips: SkipReport | undefined;
    for (let epoch = loop.start.epoch; epoch < loop.config.train.epochs; epoch++) {
      if ((yield* Ref.get(loop.progress)).stopped) break;
      const done = yield* runEpoch(loop, epoch);
      reports.push(done.report);
      runSkips = done.runSkips;
    }
    return { reports, runSkips } satisfies EpochsDone;
  });
