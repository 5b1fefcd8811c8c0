/**
 * One training step over a method: SwAV, DeepCluster-v2, SimCLR, or a user's own.
 *
 *   crops            the batch's per-sample crops -> one tensor per resolution group
 *   off the tape     the method prepares its targets' inputs (SwAV: unit-norm prototypes, the queue's
 *                    scores; DeepCluster-v2: the batch's k-means targets; SimCLR: nothing)
 *   on one tape      the method's forward: encode -> (detached) targets -> loss
 *   finite-loss      stop before any update when the loss is not a number
 *   optimise         LARC-SGD at this step's learning rate, prototypes frozen while the method says so
 *   state update     the method's state from the detached embeddings (queue, memory bank)
 *   finite-state     the updated weights and batch-norm statistics are all finite, or the run stops
 *                    here, before anything of this step reaches a checkpoint
 *
 * A method is a value (`Method`): what runs off the tape before the forward, the tape's body, the
 * state update after the optimiser, and the step's statistics.
 */
import * as tf from "@tensorflow/tfjs";
import type { NamedTensorMap, Scalar, Tensor2D, Tensor4D, Variable } from "../backend/tensor_types.ts";
import { Effect, Schema, type Scope } from "effect";
import { type Communicator, currentCommunicator } from "../backend/communicator.ts";
import { activeKernelSettings } from "../backend/kernel_settings.ts";
import { TensorBackend } from "../backend/tensor_backend.ts";
import { leanVariableGrads } from "../backend/lean_gradients.ts";
import { scoped } from "../backend/resources.ts";
import type { Batch } from "../data/loader.ts";
import type { SwavModel } from "../models/model.ts";
import { collateCrops, type MulticropConfig } from "../stages/multicrop.ts";
import type { LarcSgd, OptimiseConfig, OptimiseInput, OptimiseOutput } from "../stages/optimise.ts";
import type { Stage } from "../stages/stage.ts";
import { onTape, type TapeForward, type TapeOutputs } from "../stages/tape.ts";
import type { EmbeddingQueue } from "../state/queue.ts";
import {
  averageGradients,
  checkParametersAgree,
  type DataParallelError,
  debugParamsRequested,
  meanOverRanks,
} from "./data_parallel.ts";

/** The loss stopped being a finite number: the run stops before applying the update. */
export class NonFiniteLoss extends Schema.TaggedError<NonFiniteLoss>()("NonFiniteLoss", {
  /** The step whose loss was not finite. */
  step: Schema.Number,
  /** The loss (NaN or ±Infinity). */
  loss: Schema.Number,
  /** What happened and what to try. */
  message: Schema.String,
}) {}

/**
 * The update (or the forward's batch-norm statistics) left a weight or
 * statistic non-finite: the run stops before this step reaches a checkpoint.
 */
export class NonFiniteState extends Schema.TaggedError<NonFiniteState>()("NonFiniteState", {
  /** The step that made it non-finite. */
  step: Schema.Number,
  /** The first parameter holding a non-finite value. */
  tensor: Schema.String,
  /** What happened and what to try. */
  message: Schema.String,
}) {}

/**
 * One scalar that is 0 when every value of `variables` is finite and NaN
 * otherwise (x·0 is 0 for a finite x, NaN for ±Inf and NaN): one small fused
 * reduction per step, read together with the step's other values.
 */
export const finiteProbe = (variables: readonly Variable[]): Scalar =>
  tf.tidy(() => tf.addN(variables.map((v) => tf.sum(tf.mul(v, 0)))) as Scalar);

/** The name of the first parameter holding a non-finite value (the failure path only: reads every one). */
export const firstNonFinite = async (model: SwavModel): Promise<string | undefined> => {
  for (const p of model.params) {
    if (!(await p.variable.data()).every(Number.isFinite)) return p.name;
  }
  return undefined;
};

/**
 * The tape's body's loss and its gradients over `variables`; every returned tensor is owned by the caller.
 * `leanBackward` (the kernel settings' field) picks the walk: the training step passes its
 * `TensorBackend`'s; plain-TypeScript callers (benches, tests) outside Effect get the active settings'.
 */
export const gradientsOf = (
  forward: () => TapeForward,
  variables: readonly Variable[],
  keepFeatures = false,
  leanBackward: boolean = activeKernelSettings().leanBackward,
): TapeOutputs =>
  // tf.variableGrads' walk, freeing each gradient and saved activation after its last use; the kernel
  // settings' `leanBackward: false` keeps TF.js's own walk, for before/after measurements.
  onTape(
    leanBackward ? leanVariableGrads : tf.variableGrads,
    forward,
    variables,
    keepFeatures,
  );

/** State with an owner that the step updates; the run's scope owns and releases it. */
export interface StepState {
  /** The model trained. */
  readonly model: SwavModel;
  /** Trainable variables by parameter name. */
  readonly variables: Readonly<Record<string, Variable>>;
  /** The optimiser and its momentum slots. */
  readonly optimiser: LarcSgd;
  /** SwAV's embedding queue once it exists (it is created at swav.queueStartEpoch). */
  readonly queue: () => EmbeddingQueue | undefined;
}

/** What enters the step: a batch and where the run is. */
export interface StepInput {
  /** The batch's prepared crops. */
  readonly batch: Batch;
  /** Optimiser steps taken before this one. */
  readonly step: number;
  /** The epoch (0-based). */
  readonly epoch: number;
}

/** What a method reports of a step; a method reports what it has (SimCLR has no prototypes). */
export interface StepStatistics {
  /** Mean entropy (nats) of the codes' rows: ln K for uniform codes, 0 for one-hot ones (SwAV). */
  readonly codeEntropy?: number;
  /** Distinct prototypes that are some sample's code's argmax (SwAV) or target (DeepCluster-v2) in this batch. */
  readonly prototypesInUse?: number;
  /**
   * Mean over the embedding's dimensions of the batch's standard deviation of the unit-norm embeddings
   * (SimCLR's collapse signal): about 1/√D when they spread over the sphere, 0 when they collapse to a point.
   */
  readonly embeddingStd?: number;
}

/** What the step hands back, all values read from the backend. */
export interface StepOutcome extends StepStatistics {
  /** The step's loss (the global batch's in a data-parallel run). */
  readonly loss: number;
  /** The learning rate the step used. */
  readonly lr: number;
  /**
   * The backbone's pooled features of the batch's crops [batch * crops, F], crop-major, as constants
   * (for the online probe); owned by the caller's scope, valid until it closes.
   */
  readonly features?: Tensor2D | undefined;
}

/**
 * A training method as one value. `prepare` runs off the tape before the forward and gives the
 * tape's body for the batch's crops; `update` changes the method's state after the optimiser step
 * from the tape's detached outputs; `statistics` reads what the method reports.
 */
export interface Method<E = never> {
  /** The method's name, as `train.method` spells it. */
  readonly name: string;
  /** Off the tape, before the forward: the tape's body for this batch's crops. */
  readonly prepare: (
    input: StepInput,
  ) => Effect.Effect<(crops: readonly Tensor4D[]) => TapeForward, E, Scope.Scope>;
  /** After the optimiser step: the method's state from the tape's detached outputs. */
  readonly update: (input: StepInput, out: TapeOutputs) => Effect.Effect<void, E, Scope.Scope>;
  /** What the method reports of the step (read from the backend). */
  readonly statistics: (out: TapeOutputs, comm: Communicator) => Promise<StepStatistics>;
  /** What to try when the loss stops being finite, in the error's words. */
  readonly nonFiniteHint: string;
}

/** What the step needs of the run config besides the method. */
export interface StepSettings {
  /** The crop layout of a batch. */
  readonly multicrop: Pick<MulticropConfig, "nmbCrops" | "sizeCrops" | "channels">;
  /** The optimise stage's config. */
  readonly optimise: OptimiseConfig;
  /** The schedule's length in epochs. */
  readonly epochs: number;
  /** Whether the step keeps the backbone's features for an online probe. */
  readonly onlineProbe: boolean;
}

/** The generic step over a method: see the module comment. */
export const trainStep = <E>(
  settings: StepSettings,
  state: StepState,
  schedule: { readonly itersPerEpoch: number },
  method: Method<E>,
  optimiseStage: Stage<OptimiseInput, OptimiseOutput, OptimiseConfig, never, never>,
): (
  input: StepInput,
) => Effect.Effect<
  StepOutcome,
  NonFiniteLoss | NonFiniteState | DataParallelError | E,
  Scope.Scope | TensorBackend
> => {
  const optimise = optimiseStage.run(settings.optimise);
  const everyVariable = state.model.params.map((p) => p.variable);
  const debugParams = debugParamsRequested();
  return (
    input: StepInput,
  ): Effect.Effect<
    StepOutcome,
    NonFiniteLoss | NonFiniteState | DataParallelError | E,
    Scope.Scope | TensorBackend
  > =>
    Effect.gen(function* () {
      // The kernel settings of the backend the step runs on, and the job's communicator (data parallel:
      // the loss is the global batch's, gradients are averaged over the ranks), from the context.
      const { settings: kernels } = yield* TensorBackend;
      const comm = yield* currentCommunicator;
      const crops = yield* scoped(() => collateCrops(input.batch.views, settings.multicrop));
      // Off the tape: what the method's targets need before the forward.
      const forward = yield* method.prepare(input);
      // On one tape: encode -> targets (detached) -> loss.
      const out = yield* scoped(() =>
        gradientsOf(
          () => forward(crops),
          Object.values(state.variables),
          settings.onlineProbe,
          kernels.leanBackward,
        )
      );

      const local = (yield* Effect.promise(() => out.loss.data()))[0]!;
      // Every rank sees the same (global) loss, so a non-finite one stops all of them at this step.
      const loss = meanOverRanks(local, comm);
      if (!Number.isFinite(loss)) {
        return yield* new NonFiniteLoss({
          step: input.step,
          loss,
          message:
            `loss became ${loss} at step ${input.step} (epoch ${input.epoch + 1}); the update was not ` +
            `applied and the last checkpoint is intact. ${method.nonFiniteHint}`,
        });
      }

      const ownGrads: NamedTensorMap = {};
      for (const [name, variable] of Object.entries(state.variables)) {
        const g = out.grads[variable.name];
        if (g !== undefined) ownGrads[name] = g;
      }
      // With several ranks, averaged over them (the one-rank gradients as they are).
      const { grads } = yield* Effect.acquireRelease(
        Effect.promise(() => averageGradients(ownGrads, comm)),
        (averaged) => Effect.sync(() => tf.dispose(averaged.created)),
      );
      const { learningRate } = yield* optimise({
        optimiser: state.optimiser,
        variables: state.variables,
        grads,
        iteration: input.step,
        itersPerEpoch: schedule.itersPerEpoch,
        epochs: settings.epochs,
      });

      // Weights and batch-norm statistics as updated: checked with the same read as the statistics.
      const probe = yield* scoped(() => finiteProbe(everyVariable));
      yield* method.update(input, out);
      const [statistics, finite] = yield* Effect.promise(() =>
        Promise.all([method.statistics(out, comm), probe.data()])
      );
      if (!Number.isFinite(finite[0]!)) {
        const tensor = (yield* Effect.promise(() => firstNonFinite(state.model))) ?? "a parameter";
        return yield* new NonFiniteState({
          step: input.step,
          tensor,
          message: `step ${input.step} (epoch ${input.epoch + 1}, loss ${loss}) made ${tensor} non-finite; ` +
            `the run stops before this step is checkpointed, so the last checkpoint is intact. Try a lower ` +
            `optim.baseLr or optim.trust.`,
        });
      }
      if (debugParams) yield* checkParametersAgree(state.model, comm, input.step);
      return { loss, lr: learningRate, ...statistics, features: out.features };
    });
};
