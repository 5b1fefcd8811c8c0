/**
 * The SwAV training step, composed of the stage values from stages/, top to
 * bottom as in the paper's figure:
 *
 *   crops            the batch's per-sample crops -> one tensor per resolution group
 *   off the tape     unit-norm prototypes; the queue's scores with them
 *   on one tape      encode -> embeddings z, scores z·Cᵀ
 *                    │  sinkhorn: codes from the detached scores (+ queue)   (off the tape: no gradient)
 *                    └> swappedLoss(scores, codes)
 *   finite-loss      stop before any update when the loss is not a number
 *   optimise         LARC-SGD at this step's learning rate, prototypes frozen early on
 *   queue update     the batch's embeddings into the queue (FIFO); code statistics for metrics
 *   finite-state     the updated weights and batch-norm statistics are all finite, or the run stops
 *                    here, before anything of this step reaches a checkpoint
 *
 * A custom pipeline replaces a stage by another stage value of the same types
 * (`SwavStages`); stages/tape.ts keeps the gradient boundary.
 */
import * as tf from "@tensorflow/tfjs";
import { Effect, Schema, type Scope } from "effect";
import { activeCommunicator, type Communicator } from "../backend/communicator.ts";
import { activeKernelSettings } from "../backend/kernel_settings.ts";
import { leanVariableGrads } from "../backend/lean_gradients.ts";
import { scoped } from "../backend/resources.ts";
import { effectiveOptim, type RunConfig } from "../config/config.ts";
import type { Batch } from "../data/loader.ts";
import { PROTOTYPES_WEIGHT } from "../models/head.ts";
import type { SwavModel } from "../models/model.ts";
import { normalisePrototypes } from "../models/prototypes.ts";
import { type CropLayout, CropLayoutError, cropLayoutProblem, totalCrops } from "../stages/crop_layout.ts";
import { type EncodeConfig, type EncodeInput, type EncodeOutput, encodeStage } from "../stages/encode.ts";
import { collateCrops } from "../stages/multicrop.ts";
import {
  type LarcSgd,
  type OptimiseConfig,
  type OptimiseInput,
  type OptimiseOutput,
  optimiseStage,
} from "../stages/optimise.ts";
import { type SinkhornConfig, type SinkhornInput, sinkhornStage } from "../stages/sinkhorn.ts";
import type { Stage, TensorStage } from "../stages/stage.ts";
import { type SwappedLossConfig, type SwappedLossInput, swappedLossStage } from "../stages/swapped_loss.ts";
import { onOneTape, onTape, type TapeOutputs } from "../stages/tape.ts";
import { type EmbeddingQueue, push as pushQueue, queueScores as scoreQueue } from "../state/queue.ts";
import {
  averageGradients,
  checkParametersAgree,
  type DataParallelError,
  debugParamsRequested,
  meanOverRanks,
  prototypesInUseOverRanks,
} from "./data_parallel.ts";

/** The loss stopped being a finite number: the run stops before applying the update. */
export class NonFiniteLoss extends Schema.TaggedError<NonFiniteLoss>()("NonFiniteLoss", {
  step: Schema.Number,
  loss: Schema.Number,
  message: Schema.String,
}) {}

/**
 * The update (or the forward's batch-norm statistics) left a weight or
 * statistic non-finite: the run stops before this step reaches a checkpoint.
 */
export class NonFiniteState extends Schema.TaggedError<NonFiniteState>()("NonFiniteState", {
  step: Schema.Number,
  tensor: Schema.String,
  message: Schema.String,
}) {}

/**
 * One scalar that is 0 when every value of `variables` is finite and NaN
 * otherwise (x·0 is 0 for a finite x, NaN for ±Inf and NaN): one small fused
 * reduction per step, read together with the step's other values.
 */
export const finiteProbe = (variables: readonly tf.Variable[]): tf.Scalar =>
  tf.tidy(() => tf.addN(variables.map((v) => tf.sum(tf.mul(v, 0)))) as tf.Scalar);

/** The name of the first parameter holding a non-finite value (the failure path only: reads every one). */
export const firstNonFinite = async (model: SwavModel): Promise<string | undefined> => {
  for (const p of model.params) {
    if (!(await p.variable.data()).every(Number.isFinite)) return p.name;
  }
  return undefined;
};

/**
 * The stages one step composes. A custom pipeline passes another stage value
 * with the same input and output types, e.g. an assignment with hard codes.
 */
export interface SwavStages {
  readonly encode: TensorStage<EncodeInput, EncodeOutput, EncodeConfig, unknown, unknown>;
  readonly assign: TensorStage<SinkhornInput, readonly tf.Tensor2D[], SinkhornConfig, unknown, unknown>;
  readonly loss: TensorStage<SwappedLossInput, tf.Scalar, SwappedLossConfig, unknown, unknown>;
  readonly optimise: Stage<OptimiseInput, OptimiseOutput, OptimiseConfig, never, never>;
}

/** SwAV's own stages. */
export const swavStages: SwavStages = {
  encode: encodeStage,
  assign: sinkhornStage,
  loss: swappedLossStage,
  optimise: optimiseStage,
};

/**
 * Each stage's config, read from its sections of the run config. The learning rates are scaled
 * (optim.lrScaling) for the global batch, train.batchSize (with --procs N each rank takes 1/N of it).
 */
export const stageConfigs = (config: RunConfig) => ({
  encode: { training: true } satisfies EncodeConfig,
  assign: { epsilon: config.swav.epsilon, sinkhornIterations: config.swav.sinkhornIterations },
  loss: {
    nmbCrops: config.multicrop.nmbCrops,
    cropsForAssign: config.swav.cropsForAssign,
    temperature: config.swav.temperature,
  },
  optimise: {
    ...effectiveOptim(config.optim, config.train.batchSize),
    freezePrototypesIters: config.swav.freezePrototypesIters,
  },
});

/** The crop layout of a batch of `batchSize` samples. */
export const cropLayout = (config: RunConfig, batchSize: number): CropLayout => ({
  batchSize,
  nmbCrops: config.multicrop.nmbCrops,
  cropsForAssign: config.swav.cropsForAssign,
});

/**
 * The tape's body for `model` on batches of `batchSize`: encode, Sinkhorn codes
 * from the detached scores (queue rows prepended), swapped loss. Synchronous.
 */
export const swavTape = (
  model: SwavModel,
  config: RunConfig,
  batchSize: number,
  stages: SwavStages = swavStages,
) => {
  const configs = stageConfigs(config);
  const forward = onOneTape(
    stages.encode.apply(configs.encode),
    stages.assign.apply(configs.assign),
    stages.loss.apply(configs.loss),
  );
  const layout = cropLayout(config, batchSize);
  return (cropGroups: readonly tf.Tensor4D[], queueScores?: readonly tf.Tensor2D[]) =>
    forward({ encode: { model, cropGroups }, layout, queueScores });
};
export type SwavTape = ReturnType<typeof swavTape>;

/** The tape's loss and its gradients over `variables`; every returned tensor is owned by the caller. */
export const forwardBackward = (
  tape: SwavTape,
  crops: readonly tf.Tensor4D[],
  variables: readonly tf.Variable[],
  options: { queueScores?: readonly tf.Tensor2D[] | undefined; keepFeatures?: boolean } = {},
): TapeOutputs =>
  onTape(
    // tf.variableGrads' walk, freeing each gradient and saved activation after its last use; the kernel
    // settings' `leanBackward: false` keeps TF.js's own walk, for before/after measurements.
    activeKernelSettings().leanBackward ? leanVariableGrads : tf.variableGrads,
    () => tape(crops, options.queueScores),
    variables,
    options.keepFeatures,
  );

/**
 * Code entropy and prototypes in use, read from the codes (asynchronously); with
 * several ranks, of the global batch (mean entropy, prototypes used on any rank).
 */
export const codeStatistics = async (
  codes: readonly tf.Tensor2D[],
  comm: Communicator = activeCommunicator(),
): Promise<{ readonly codeEntropy: number; readonly prototypesInUse: number }> => {
  const [entropy, argmax] = tf.tidy(() => {
    const all = tf.concat(codes as tf.Tensor2D[], 0);
    const h = all.mul(all.add(1e-12).log()).sum(1).neg().mean();
    return [h, all.argMax(1)];
  });
  const [h, winners] = await Promise.all([entropy.data(), argmax.data()]);
  tf.dispose([entropy, argmax]);
  if (comm.size > 1) {
    return {
      codeEntropy: meanOverRanks(h[0]!, comm),
      prototypesInUse: prototypesInUseOverRanks(winners, codes[0]!.shape[1], comm),
    };
  }
  return { codeEntropy: h[0]!, prototypesInUse: new Set(winners).size };
};

/** State with an owner that the step updates; the run's scope owns and releases it. */
export interface StepState {
  readonly model: SwavModel;
  /** Trainable variables by parameter name. */
  readonly variables: Readonly<Record<string, tf.Variable>>;
  readonly optimiser: LarcSgd;
  /** The embedding queue once it exists (it is created at swav.queueStartEpoch). */
  readonly queue: () => EmbeddingQueue | undefined;
}

/** What enters the step: a batch and where the run is. */
export interface StepInput {
  readonly batch: Batch;
  /** Optimiser steps taken before this one. */
  readonly step: number;
  readonly epoch: number;
}

/** What the step hands back, all values read from the backend. */
export interface StepOutcome {
  readonly loss: number;
  readonly lr: number;
  /** Mean entropy (nats) of the codes' rows: ln K for uniform codes, 0 for one-hot ones. */
  readonly codeEntropy: number;
  /** Distinct prototypes that are the argmax of some sample's code in this batch. */
  readonly prototypesInUse: number;
  /**
   * The backbone's pooled features of the batch's crops [batch * crops, F], crop-major, as constants
   * (for the online probe); owned by the caller's scope, valid until it closes.
   */
  readonly features?: tf.Tensor2D | undefined;
}

/**
 * The whole step for a run: the stages configured with their sections of the
 * run config. Fails with CropLayoutError when the crop layout cannot work.
 */
export const swavTrainStep = (
  config: RunConfig,
  state: StepState,
  schedule: { readonly batchSize: number; readonly itersPerEpoch: number },
  stages: SwavStages = swavStages,
) =>
  Effect.gen(function* () {
    const { batchSize, itersPerEpoch } = schedule;
    const problem = cropLayoutProblem(
      cropLayout(config, batchSize),
      batchSize * totalCrops(config.multicrop.nmbCrops),
    );
    if (problem !== undefined) return yield* new CropLayoutError({ message: problem });
    const tape = swavTape(state.model, config, batchSize, stages);
    const optimise = stages.optimise.run(stageConfigs(config).optimise);
    const prototypes = state.model.param(PROTOTYPES_WEIGHT) as tf.Variable<tf.Rank.R2>;

    const everyVariable = state.model.params.map((p) => p.variable);
    // Data parallel (several ranks): the loss is the global batch's, gradients are averaged over the ranks.
    const comm = activeCommunicator();
    const debugParams = debugParamsRequested();

    return (
      input: StepInput,
    ): Effect.Effect<StepOutcome, NonFiniteLoss | NonFiniteState | DataParallelError, Scope.Scope> =>
      Effect.gen(function* () {
        const crops = yield* scoped(() => collateCrops(input.batch.views, config.multicrop));

        // Off the tape: unit-norm prototypes before the forward pass, as the reference does, and the
        // queue's scores with them (undefined until the queue is full).
        normalisePrototypes(prototypes);
        const queue = state.queue();
        const queueScores = queue === undefined ? undefined : yield* scoreQueue(queue, prototypes);

        // On one tape: encode -> scores -> (detached) Sinkhorn codes -> swapped prediction.
        const out = yield* scoped(() =>
          forwardBackward(tape, crops, Object.values(state.variables), {
            queueScores,
            keepFeatures: config.train.onlineProbe,
          })
        );

        const local = (yield* Effect.promise(() => out.loss.data()))[0]!;
        // Every rank sees the same (global) loss, so a non-finite one stops all of them at this step.
        const loss = comm.size > 1 ? meanOverRanks(local, comm) : local;
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

        let grads: tf.NamedTensorMap = {};
        for (const [name, variable] of Object.entries(state.variables)) {
          const g = out.grads[variable.name];
          if (g !== undefined) grads[name] = g;
        }
        if (comm.size > 1) {
          grads = (yield* Effect.acquireRelease(
            Effect.promise(() => averageGradients(grads, comm)),
            (averaged) => Effect.sync(() => tf.dispose(averaged.created)),
          )).grads;
        }
        const { learningRate } = yield* optimise({
          optimiser: state.optimiser,
          variables: state.variables,
          grads,
          iteration: input.step,
          itersPerEpoch,
          epochs: config.train.epochs,
        });

        // Weights and batch-norm statistics as updated: checked with the same read as the code statistics.
        const probe = yield* scoped(() => finiteProbe(everyVariable));
        if (queue !== undefined) yield* pushQueue(queue, out.embeddings).pipe(Effect.orDie);
        const [statistics, finite] = yield* Effect.promise(() =>
          Promise.all([codeStatistics(out.codes, comm), probe.data()])
        );
        if (!Number.isFinite(finite[0]!)) {
          const tensor = (yield* Effect.promise(() => firstNonFinite(state.model))) ?? "a parameter";
          return yield* new NonFiniteState({
            step: input.step,
            tensor,
            message:
              `step ${input.step} (epoch ${input.epoch + 1}, loss ${loss}) made ${tensor} non-finite; ` +
              `the run stops before this step is checkpointed, so the last checkpoint is intact. Try a lower ` +
              `optim.baseLr or optim.trust.`,
          });
        }
        if (debugParams) yield* checkParametersAgree(state.model, comm, input.step);
        return { loss, lr: learningRate, ...statistics, features: out.features };
      });
  });
