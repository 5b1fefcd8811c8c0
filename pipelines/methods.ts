/**
 * The run's method (train.method) for the pretrain pipeline: its step, its state
 * (DeepCluster-v2's memory bank), its epoch-start hook and its collapse check.
 */
import { Effect, type Stream } from "effect";
import type { Communicator } from "../backend/communicator.ts";
import { effectiveOptim, type RunConfig } from "../config/config.ts";
import type { Batch } from "../data/loader.ts";
import { prototypeHeads, type SwavModel } from "../models/model.ts";
import { optimiseStage } from "../stages/optimise.ts";
import { makeMemoryBank, type MemoryBank } from "../state/memory_bank.ts";
import { collapseWarning, embeddingCollapseWarning } from "./collapse.ts";
import {
  clusterMemory,
  deepClusterV2Method,
  fillMemoryBank,
  setPrototypes,
  startRows,
} from "./deepclusterv2.ts";
import { simclrMethod } from "./simclr.ts";
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

/**
 * The method's epoch start: DeepCluster-v2 fills its bank once (the first epoch's batches, before
 * training) and clusters it at the start of each epoch it begins from the first batch.
 */
export const startMethodEpoch = <E>(
  config: RunConfig,
  model: SwavModel,
  bank: MemoryBank | undefined,
  epoch: number,
  skip: number,
  batches: () => Stream.Stream<Batch, E>,
  comm: Communicator,
) =>
  Effect.gen(function* () {
    if (bank === undefined) return;
    if (!bank.filled) yield* fillMemoryBank(model, bank, config, batches(), comm);
    if (skip > 0) return;
    const centroids = yield* clusterMemory(
      bank,
      prototypeHeads(model.config).map((head) => head.k),
      config.deepclusterv2.kmeansIterations,
      (head, n, k) => startRows(n, k, config.train.seed, epoch, head),
      comm,
    );
    setPrototypes(model, centroids);
  });

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
