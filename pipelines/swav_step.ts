/**
 * SwAV as a method of the generic step (pipelines/train_step.ts), composed of
 * the stage values from stages/, as in the paper's figure:
 *
 *   off the tape     unit-norm prototypes; the queue's scores with them
 *   on one tape      encode -> embeddings z, scores z·Cᵀ
 *                    │  sinkhorn: codes from the detached scores (+ queue)   (off the tape: no gradient)
 *                    └> swappedLoss(scores, codes)
 *   state update     the batch's embeddings into the queue (FIFO); code statistics for metrics
 *
 * A custom pipeline replaces a stage by another stage value of the same types
 * (`SwavStages`); stages/tape.ts keeps the gradient boundary.
 */
import * as tf from "@tensorflow/tfjs";
import type { Scalar, Tensor2D, Tensor4D, Variable } from "../backend/tensor_types.ts";
import { Effect, type Scope } from "effect";
import { type Communicator, singleProcess } from "../backend/communicator.ts";
import type { TensorBackend } from "../backend/tensor_backend.ts";
import { effectiveOptim, type RunConfig } from "../config/config.ts";
import { PROTOTYPES_WEIGHT } from "../models/head.ts";
import type { SwavModel } from "../models/model.ts";
import { normalisePrototypes } from "../models/prototypes.ts";
import { type CropLayout, CropLayoutError, cropLayoutProblem, totalCrops } from "../stages/crop_layout.ts";
import { type EncodeConfig, type EncodeInput, type EncodeOutput, encodeStage } from "../stages/encode.ts";
import {
  type OptimiseConfig,
  type OptimiseInput,
  type OptimiseOutput,
  optimiseStage,
} from "../stages/optimise.ts";
import { type SinkhornConfig, type SinkhornInput, sinkhornStage } from "../stages/sinkhorn.ts";
import type { Stage, TensorStage } from "../stages/stage.ts";
import { type SwappedLossConfig, type SwappedLossInput, swappedLossStage } from "../stages/swapped_loss.ts";
import { onOneTape, type TapeForward, type TapeOutputs } from "../stages/tape.ts";
import { push as pushQueue, queueScores as scoreQueue } from "../state/queue.ts";
import { type DataParallelError, meanOverRanks, prototypesInUseOverRanks } from "./data_parallel.ts";
import {
  gradientsOf,
  type Method,
  type NonFiniteLoss,
  type NonFiniteState,
  type StepInput,
  type StepOutcome,
  type StepSettings,
  type StepState,
  trainStep,
} from "./train_step.ts";

export {
  finiteProbe,
  firstNonFinite,
  NonFiniteLoss,
  NonFiniteState,
  type StepInput,
  type StepOutcome,
  type StepState,
} from "./train_step.ts";

/**
 * The stages one step composes. A custom pipeline passes another stage value
 * with the same input and output types, e.g. an assignment with hard codes.
 */
export interface SwavStages {
  /** Crops to embeddings and prototype scores (default `encodeStage`). */
  readonly encode: TensorStage<EncodeInput, EncodeOutput, EncodeConfig, unknown, unknown>;
  /** Detached scores to codes (default `sinkhornStage`). */
  readonly assign: TensorStage<SinkhornInput, readonly Tensor2D[], SinkhornConfig, unknown, unknown>;
  /** Scores and codes to the loss (default `swappedLossStage`). */
  readonly loss: TensorStage<SwappedLossInput, Scalar, SwappedLossConfig, unknown, unknown>;
  /** One optimiser step (default `optimiseStage`). */
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
): SwavTape => {
  const configs = stageConfigs(config);
  const forward = onOneTape(
    stages.encode.apply(configs.encode),
    stages.assign.apply(configs.assign),
    stages.loss.apply(configs.loss),
  );
  const layout = cropLayout(config, batchSize);
  return (cropGroups: readonly Tensor4D[], queueScores?: readonly Tensor2D[]) =>
    forward({ encode: { model, cropGroups }, layout, queueScores });
};
/** SwAV's tape body for one model and batch size: the batch's crops (and the queue's scores) to the forward's outputs. */
export type SwavTape = (cropGroups: readonly Tensor4D[], queueScores?: readonly Tensor2D[]) => TapeForward;

/** The tape's loss and its gradients over `variables`; every returned tensor is owned by the caller. */
export const forwardBackward = (
  tape: SwavTape,
  crops: readonly Tensor4D[],
  variables: readonly Variable[],
  options: { queueScores?: readonly Tensor2D[] | undefined; keepFeatures?: boolean } = {},
): TapeOutputs => gradientsOf(() => tape(crops, options.queueScores), variables, options.keepFeatures);

/**
 * Code entropy and prototypes in use, read from the codes (asynchronously); with
 * several ranks, of the global batch (mean entropy, prototypes used on any rank).
 */
export const codeStatistics = async (
  codes: readonly Tensor2D[],
  comm: Communicator = singleProcess,
): Promise<{ readonly codeEntropy: number; readonly prototypesInUse: number }> => {
  const [entropy, argmax] = tf.tidy(() => {
    const all = tf.concat(codes as Tensor2D[], 0);
    const h = all.mul(all.add(1e-12).log()).sum(1).neg().mean();
    return [h, all.argMax(1)];
  });
  const [h, winners] = await Promise.all([entropy.data(), argmax.data()]);
  tf.dispose([entropy, argmax]);
  return {
    codeEntropy: meanOverRanks(h[0]!, comm),
    prototypesInUse: prototypesInUseOverRanks(winners, codes[0]!.shape[1], comm),
  };
};

/**
 * SwAV as a method value for the generic step: off the tape, unit-norm prototypes and the queue's
 * scores; on the tape, encode -> Sinkhorn codes -> swapped prediction; after the update, the queue.
 */
export const swavMethod = (
  config: RunConfig,
  state: StepState,
  batchSize: number,
  stages: SwavStages = swavStages,
): Method => {
  const tape = swavTape(state.model, config, batchSize, stages);
  const prototypes = state.model.param(PROTOTYPES_WEIGHT) as tf.Variable<tf.Rank.R2>;
  return {
    name: "swav",
    prepare: () =>
      Effect.gen(function* () {
        // Unit-norm prototypes before the forward pass, as the reference does, and the queue's scores
        // with them (undefined until the queue is full).
        normalisePrototypes(prototypes);
        const queue = state.queue();
        const queueScores = queue === undefined ? undefined : yield* scoreQueue(queue, prototypes);
        return (crops) => tape(crops, queueScores);
      }),
    update: (_input, out) =>
      Effect.suspend(() => {
        const queue = state.queue();
        return queue === undefined ? Effect.void : pushQueue(queue, out.embeddings).pipe(Effect.orDie);
      }),
    statistics: (out, comm) => codeStatistics(out.codes, comm),
    nonFiniteHint: "Try a lower optim.baseLr, a larger swav.epsilon, or a larger batch.",
  };
};

/**
 * The whole SwAV step for a run: the stages configured with their sections of the
 * run config. Fails with CropLayoutError when the crop layout cannot work.
 *
 * @example One SwAV step on one batch of a tiny data set
 * ```ts
 * import { Effect, Stream } from "effect";
 * import assert from "node:assert/strict";
 * import {
 *   decodeRunConfig,
 *   makeLarcSgd,
 *   makeLoader,
 *   multicropPrepare,
 *   openSource,
 *   scopedSwavModel,
 *   swavTrainStep,
 *   TensorBackend,
 *   writeDemoDataset,
 * } from "@swav/swav-ts";
 *
 * const data = await Deno.makeTempDir();
 * await writeDemoDataset({ folder: data, perClassTrain: 1, perClassTest: 1, size: 16, seed: 1 });
 * const outcome = await Effect.runPromise(Effect.scoped(Effect.gen(function* () {
 *   const config = yield* decodeRunConfig({
 *     multicrop: { nmbCrops: [2, 2], sizeCrops: [16, 8], minScaleCrops: [0.3, 0.1], maxScaleCrops: [1, 0.3] },
 *     model: { arch: "resnet18", width: 4, stem: "cifar", hidden: 32, out: 16, prototypes: 20 },
 *   });
 *   // The step's state: the model, its trainable variables by name, the optimiser, the queue (none here).
 *   const model = yield* scopedSwavModel(config.model, 0);
 *   const variables = Object.fromEntries(model.params.filter((p) => p.trainable).map((p) => [p.name, p.variable]));
 *   const optimiser = yield* makeLarcSgd({ momentum: 0.9, weightDecay: 1e-6, trustCoefficient: 0.001, eps: 1e-8, clip: false });
 *   const state = { model, variables, optimiser, queue: () => undefined };
 *   const step = yield* swavTrainStep(config, state, { batchSize: 8, itersPerEpoch: 1 });
 *   const source = yield* openSource(`${data}:train`);
 *   const loader = yield* makeLoader({ source, prepare: multicropPrepare(config.multicrop), seed: 0, batchSize: 8 });
 *   const [batch] = yield* Stream.runCollect(Stream.take(loader.epoch(0), 1));
 *   return yield* step({ batch: batch!, step: 0, epoch: 0 });
 * })).pipe(Effect.provide(TensorBackend.layer("wasm"))));
 * assert.ok(Number.isFinite(outcome.loss));
 * assert.ok(outcome.prototypesInUse! >= 1 && outcome.prototypesInUse! <= 20);
 * await Deno.remove(data, { recursive: true });
 * ```
 */
export const swavTrainStep = (
  config: RunConfig,
  state: StepState,
  schedule: { readonly batchSize: number; readonly itersPerEpoch: number },
  stages: SwavStages = swavStages,
): Effect.Effect<
  (
    input: StepInput,
  ) => Effect.Effect<
    StepOutcome,
    NonFiniteLoss | NonFiniteState | DataParallelError,
    Scope.Scope | TensorBackend
  >,
  CropLayoutError
> =>
  Effect.gen(function* () {
    const { batchSize, itersPerEpoch } = schedule;
    const problem = cropLayoutProblem(
      cropLayout(config, batchSize),
      batchSize * totalCrops(config.multicrop.nmbCrops),
    );
    if (problem !== undefined) return yield* new CropLayoutError({ message: problem });
    return trainStep(
      stepSettings(config, stageConfigs(config).optimise),
      state,
      { itersPerEpoch },
      swavMethod(config, state, batchSize, stages),
      stages.optimise,
    );
  });

/** The generic step's settings from the run config, with the method's optimise config. */
export const stepSettings = (config: RunConfig, optimise: OptimiseConfig): StepSettings => ({
  multicrop: config.multicrop,
  optimise,
  epochs: config.train.epochs,
  onlineProbe: config.train.onlineProbe,
});
