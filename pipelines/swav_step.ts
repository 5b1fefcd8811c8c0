/**
 * The SwAV training step as stage values, composed top to bottom like the
 * paper's figure:
 *
 *   collate            batch of crops (per sample) -> one tensor per resolution group
 *   swappedPrediction  encode -> sinkhorn (detached scores + queue) -> swappedLoss, in one gradient tape
 *   finiteLoss         stop before any update when the loss is not a number
 *   optimise           LARC-SGD at this step's learning rate, prototypes frozen early on
 *   updateQueue        the batch's embeddings into the queue (FIFO)
 *   codeStatistics     code entropy and prototypes in use, for metrics and the collapse check
 *
 * Each stage has a typed input and output, a validated config (its section of
 * the run config) and its requirements: `TrainingState` (the model, optimiser
 * and queue owned by the run's scope) and a `Scope` that owns the step's tensors.
 */
import * as tf from "@tensorflow/tfjs";
import { Context, Effect, Schema, type Scope } from "effect";
import { scoped } from "../backend/resources.ts";
import { SwavConfig } from "../config/config.ts";
import type { Batch } from "../data/loader.ts";
import { PROTOTYPES_WEIGHT } from "../models/head.ts";
import type { SwavModel } from "../models/model.ts";
import { normalisePrototypes } from "../models/prototypes.ts";
import { collateCrops, MulticropConfig } from "../stages/multicrop.ts";
import type { LarcSgd } from "../stages/optimise.ts";
import { defineStage } from "../stages/stage.ts";
import { type EmbeddingQueue, push as pushQueue, queueScores as scoreQueue } from "../state/queue.ts";
import { codeStatistics, forwardBackward, type TapeOutputs, type TrainStepParts } from "./train_step.ts";

/** The loss stopped being a finite number: the run stops before applying the update. */
export class NonFiniteLoss extends Schema.TaggedError<NonFiniteLoss>()("NonFiniteLoss", {
  step: Schema.Number,
  loss: Schema.Number,
  message: Schema.String,
}) {}

/** State with an owner that the step stages use; the pretraining run's scope provides and releases it. */
export class TrainingState extends Context.Service<TrainingState, {
  readonly model: SwavModel;
  /** Trainable variables by parameter name. */
  readonly variables: Readonly<Record<string, tf.Variable>>;
  /** What runs inside the gradient tape (encoder, assignment, loss). */
  readonly parts: TrainStepParts;
  readonly optimiser: LarcSgd;
  /** The embedding queue once it exists (it is created at swav.queueStartEpoch). */
  readonly queue: () => EmbeddingQueue | undefined;
}>()("swav-ts/pipelines/TrainingState") {}

/** What enters the step: a batch and where the run is. */
export interface StepInput {
  readonly batch: Batch;
  /** Optimiser steps taken before this one. */
  readonly step: number;
  readonly epoch: number;
  readonly lr: number;
}

type WithCrops = StepInput & { readonly crops: tf.Tensor4D[] };
type WithTape = WithCrops & { readonly tape: TapeOutputs };
type WithLoss = WithTape & { readonly loss: number };

/** What the step hands back. */
export type StepOutcome = WithLoss & { readonly codeEntropy: number; readonly prototypesInUse: number };

const CollateConfig = MulticropConfig;

export const collateStage = defineStage<StepInput, WithCrops, MulticropConfig, never, Scope.Scope>({
  name: "collate",
  config: CollateConfig,
  run: (config) => (input) =>
    Effect.map(scoped(() => collateCrops(input.batch.views, config)), (crops) => ({ ...input, crops })),
});

export const swappedPredictionStage = defineStage<
  WithCrops,
  WithTape,
  SwavConfig,
  never,
  TrainingState | Scope.Scope
>({
  name: "encode → sinkhorn → swappedLoss",
  config: SwavConfig,
  run: () => (input) =>
    Effect.gen(function* () {
      const state = yield* TrainingState;
      // Off the tape: unit-norm prototypes before the forward pass, as the reference does, and the
      // queue's scores with them (undefined until the queue is full).
      const prototypes = state.model.param(PROTOTYPES_WEIGHT) as tf.Variable<tf.Rank.R2>;
      normalisePrototypes(prototypes);
      const queue = state.queue();
      const queueScores = queue === undefined ? undefined : yield* scoreQueue(queue, prototypes);
      // On the tape: encode, codes from detached scores, swapped loss (pipelines/train_step.ts).
      const tape = yield* scoped(() =>
        forwardBackward(state.parts, input.crops, Object.values(state.variables), { queueScores })
      );
      return { ...input, tape };
    }),
});

export const finiteLossStage = defineStage<WithTape, WithLoss, SwavConfig, NonFiniteLoss>({
  name: "finiteLoss",
  config: SwavConfig,
  run: () => (input) =>
    Effect.gen(function* () {
      const loss = (yield* Effect.promise(() => input.tape.loss.data()))[0]!;
      if (!Number.isFinite(loss)) {
        return yield* new NonFiniteLoss({
          step: input.step,
          loss,
          message:
            `loss became ${loss} at step ${input.step} (epoch ${input.epoch + 1}); the update was not ` +
            `applied and the last checkpoint is intact. Try a lower optim.baseLr, a larger swav.epsilon, ` +
            `or a larger batch.`,
        });
      }
      return { ...input, loss };
    }),
});

export const optimiseStepStage = defineStage<WithLoss, WithLoss, SwavConfig, never, TrainingState>({
  name: "optimise",
  config: SwavConfig,
  run: (config) => (input) =>
    Effect.gen(function* () {
      const state = yield* TrainingState;
      const grads: tf.NamedTensorMap = {};
      for (const [name, variable] of Object.entries(state.variables)) {
        const g = input.tape.grads[variable.name];
        if (g !== undefined) grads[name] = g;
      }
      const frozen = input.step < config.freezePrototypesIters;
      state.optimiser.step(state.variables, grads, input.lr, (name) => frozen && name === PROTOTYPES_WEIGHT);
      return input;
    }),
});

export const updateQueueStage = defineStage<WithLoss, WithLoss, SwavConfig, never, TrainingState>({
  name: "updateQueue",
  config: SwavConfig,
  run: () => (input) =>
    Effect.gen(function* () {
      const queue = (yield* TrainingState).queue();
      if (queue !== undefined) yield* pushQueue(queue, input.tape.embeddings).pipe(Effect.orDie);
      return input;
    }),
});

export const codeStatisticsStage = defineStage<WithLoss, StepOutcome, SwavConfig>({
  name: "codeStatistics",
  config: SwavConfig,
  run: () => (input) =>
    Effect.map(Effect.promise(() => codeStatistics(input.tape.codes)), (stats) => ({ ...input, ...stats })),
});

/** The whole step: the stages above, configured with their sections of the run config, in order. */
export const swavTrainStep = (config: { readonly multicrop: MulticropConfig; readonly swav: SwavConfig }) => {
  const collate = collateStage.run(config.multicrop);
  const swappedPrediction = swappedPredictionStage.run(config.swav);
  const finiteLoss = finiteLossStage.run(config.swav);
  const optimise = optimiseStepStage.run(config.swav);
  const updateQueue = updateQueueStage.run(config.swav);
  const statistics = codeStatisticsStage.run(config.swav);
  return (input: StepInput) =>
    collate(input).pipe(
      Effect.flatMap(swappedPrediction),
      Effect.flatMap(finiteLoss),
      Effect.flatMap(optimise),
      Effect.flatMap(updateQueue),
      Effect.flatMap(statistics),
    );
};
