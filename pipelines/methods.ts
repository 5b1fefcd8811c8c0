/**
 * The run's method (train.method) for the pretrain pipeline: its step, its state
 * (DeepCluster-v2's memory bank), its epoch-start hook and its collapse check.
 */
import { Effect, Stream } from "effect";
import type { Communicator } from "../backend/communicator.ts";
import { effectiveOptim, type RunConfig } from "../config/config.ts";
import type { Batch } from "../data/loader.ts";
import { prototypeHeads, type SwavModel } from "../models/model.ts";
import { optimiseStage } from "../stages/optimise.ts";
import { makeMemoryBank, type MemoryBank, presentIds } from "../state/memory_bank.ts";
import { collapseWarning, embeddingCollapseWarning } from "./collapse.ts";
import {
  type BankTooSmall,
  clusterMemory,
  deepClusterV2Method,
  fillMemoryBank,
  setPrototypes,
  startRows,
} from "./deepclusterv2.ts";
import { globalPresence } from "./data_parallel_methods.ts";
import { simclrMethod } from "./simclr.ts";
import { plural } from "./wording.ts";
import { stepSettings, type SwavStages, swavTrainStep } from "./swav_step.ts";
import { type Method, type StepOutcome, type StepState, trainStep } from "./train_step.ts";

/** DeepCluster-v2's memory bank for a data set of `size` samples; undefined for the other methods. */
export const methodState = (config: RunConfig, size: number): MemoryBank | undefined =>
  config.train.method !== "deepclusterv2" ? undefined : makeMemoryBank({
    size,
    dim: config.model.out,
    crops: config.deepclusterv2.cropsForAssign.length,
    heads: prototypeHeads(config.model).length,
  });

/** A user's own method for the stock pipeline: made from the run config and the step's state. */
export type CustomMethod = (config: RunConfig, state: StepState, batchSize: number) => Method;

/** The run's training step for its method (or a user's own, `custom`). */
export const methodTrainStep = (
  config: RunConfig,
  state: StepState,
  schedule: { readonly batchSize: number; readonly itersPerEpoch: number },
  stages: SwavStages,
  bank: MemoryBank | undefined,
  comm: Communicator,
  custom?: CustomMethod,
) =>
  Effect.gen(function* () {
    const method = config.train.method;
    if (custom !== undefined) {
      const optim = effectiveOptim(config.optim, config.train.batchSize);
      return trainStep(
        stepSettings(config, { ...optim, freezePrototypesIters: config.swav.freezePrototypesIters }),
        state,
        { itersPerEpoch: schedule.itersPerEpoch },
        custom(config, state, schedule.batchSize),
        optimiseStage,
      );
    }
    if (method === "swav") return yield* swavTrainStep(config, state, schedule, stages);
    const optim = effectiveOptim(config.optim, config.train.batchSize);
    const { itersPerEpoch, batchSize } = schedule;
    return method === "deepclusterv2"
      ? trainStep(
        stepSettings(config, { ...optim, freezePrototypesIters: config.deepclusterv2.freezePrototypesIters }),
        state,
        { itersPerEpoch },
        deepClusterV2Method(config, state, bank!, comm),
        optimiseStage,
      )
      : trainStep(
        stepSettings(config, { ...optim, freezePrototypesIters: 0 }),
        state,
        { itersPerEpoch },
        simclrMethod(config, state, batchSize),
        optimiseStage,
      );
  });

/** Where DeepCluster-v2's epoch start tells its progress, and how many batches the bank's fill reads. */
export interface EpochStartProgress {
  readonly onInfo?: ((message: string) => void) | undefined;
  readonly batchesPerEpoch?: number;
}

/**
 * What DeepCluster-v2's epoch start took, in seconds: the bank's first fill (0 when the bank was
 * already filled) and the k-means (0 at a resumed epoch's start, which keeps the saved targets).
 */
export interface MethodEpochTimes {
  readonly fillSeconds: number;
  readonly kmeansSeconds: number;
}

/**
 * The method's epoch start: DeepCluster-v2 fills its bank once (the first epoch's batches, before
 * training) and clusters it at the start of each epoch it begins from the first batch, each told
 * through `progress.onInfo` (on a large data set they take minutes) and timed; undefined for the
 * methods without an epoch start.
 */
export const startMethodEpoch = <E>(
  config: RunConfig,
  model: SwavModel,
  bank: MemoryBank | undefined,
  epoch: number,
  skip: number,
  batches: () => Stream.Stream<Batch, E>,
  comm: Communicator,
  progress: EpochStartProgress = {},
): Effect.Effect<MethodEpochTimes | undefined, E | BankTooSmall> =>
  Effect.gen(function* () {
    if (bank === undefined) return undefined;
    const fillSeconds = bank.filled ? 0 : yield* timedFill(config, model, bank, batches, comm, progress);
    if (skip > 0) return { fillSeconds, kmeansSeconds: 0 };
    const heads = prototypeHeads(model.config).map((head) => head.k);
    const rows = presentIds({ ...bank, present: globalPresence(bank, comm) }).length;
    const t0 = performance.now();
    const centroids = yield* clusterMemory(
      bank,
      heads,
      config.deepclusterv2.kmeansIterations,
      (head, n, k) => startRows(n, k, config.train.seed, epoch, head),
      comm,
    );
    setPrototypes(model, centroids);
    const kmeansSeconds = (performance.now() - t0) / 1000;
    const clusters = heads.every((k) => k === heads[0])
      ? `${plural(heads.length, "head")} x ${heads[0]} clusters`
      : `heads of ${heads.join(", ")} clusters`;
    progress.onInfo?.(
      `epoch ${epoch + 1}: k-means: ${clusters} over ${rows} rows ` +
        `(${config.deepclusterv2.kmeansIterations} iterations) in ${kmeansSeconds.toFixed(1)} s`,
    );
    return { fillSeconds, kmeansSeconds };
  });

/**
 * The bank's first fill, told at its start and end and about every tenth of the way on a long
 * one (never per batch); its seconds.
 */
const timedFill = <E>(
  config: RunConfig,
  model: SwavModel,
  bank: MemoryBank,
  batches: () => Stream.Stream<Batch, E>,
  comm: Communicator,
  progress: EpochStartProgress,
) =>
  Effect.gen(function* () {
    const { onInfo, batchesPerEpoch: total } = progress;
    const crops = config.deepclusterv2.cropsForAssign.length;
    onInfo?.(
      `filling the memory bank: ${plural(bank.size, "sample")}, ${plural(crops, "crop")} ` +
        `(one no-gradient forward per assignment crop${total === undefined ? "" : ` over ${total} batches`})`,
    );
    const t0 = performance.now();
    const seconds = () => ((performance.now() - t0) / 1000).toFixed(1);
    // Each batch is counted as the next one arrives (the fill runs it after).
    let arrived = 0;
    const counted = total === undefined ? batches() : batches().pipe(Stream.tap(() =>
      Effect.sync(() => {
        const done = arrived++;
        if (fillProgressDue(done, total)) {
          onInfo?.(
            `filling the memory bank: ${done}/${total} batches (${Math.round((100 * done) / total)}%), ` +
              `${seconds()} s`,
          );
        }
      })
    ));
    yield* fillMemoryBank(model, bank, config, counted, comm);
    onInfo?.(`filling the memory bank: done in ${seconds()} s`);
    return (performance.now() - t0) / 1000;
  });

/** Fills of fewer batches than this print no intermediate progress (a line a batch would be noise). */
const FILL_PROGRESS_MIN_BATCHES = 20;

/**
 * Whether the fill tells its progress after `done` of `total` batches: about every tenth of the way
 * (never at the start or the end, which have their own lines), and never for a fill of a few batches.
 */
export const fillProgressDue = (done: number, total: number): boolean => {
  if (total < FILL_PROGRESS_MIN_BATCHES) return false;
  const every = Math.ceil(total / 10);
  return done > 0 && done < total && done % every === 0;
};

/** The collapse check of the run's method after step `step`. */
export const methodCollapseWarning = (config: RunConfig, step: number, outcome: StepOutcome) => {
  switch (config.train.method) {
    case "swav":
      return collapseWarning(step, outcome.loss, outcome.prototypesInUse ?? 0, {
        prototypes: prototypeHeads(config.model)[0]!.k,
        freezePrototypesIters: config.swav.freezePrototypesIters,
      });
    case "deepclusterv2":
      // The targets' spread in the batch: k-means clusters every sample into one when the embeddings collapse.
      return collapseWarning(step, Number.NaN, outcome.prototypesInUse ?? 0, {
        prototypes: prototypeHeads(config.model)[0]!.k,
        freezePrototypesIters: 0,
      });
    case "simclr":
      return embeddingCollapseWarning(step, outcome.embeddingStd ?? Number.NaN, config.model.out);
  }
};
