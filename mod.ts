/**
 * swav-ts: SwAV self-supervised image representation learning (Caron et al. 2020)
 * on Deno with TensorFlow.js and Effect.
 *
 * The public API: the six stages, the pipelines built from them, the backend
 * service, state with an owner (queue, optimiser), and resource helpers.
 * @module
 */

// Backend and tensor resources
export {
  BackendName,
  BackendUnavailable,
  defaultKernelSettings,
  initBackend,
  type KernelSettings,
  KernelSettingsInvalid,
  probeWebGpu,
  resolveBackendName,
  TensorBackend,
  withKernelSettings,
} from "./backend/tensor_backend.ts";
export { disposeAll, liveTensors, scoped, scopedPromise, type TensorContainer } from "./backend/resources.ts";

// The stage abstraction
export {
  andThen,
  ConfigError,
  configure,
  defineStage,
  defineTensorStage,
  type Stage,
  type TensorStage,
  tensorStage,
} from "./stages/stage.ts";
export { detached, onOneTape, onTape, type TapeOutputs, type VariableGrads } from "./stages/tape.ts";
export { type CropLayout, CropLayoutError } from "./stages/crop_layout.ts";

// Stage: decode
export { DecodeError, decodeImage, type RgbImage } from "./data/image_codec.ts";
export { decodeStage } from "./stages/decode.ts";
export { type DataSource, openSource, parseSourceSpec, type Sample, SourceError } from "./data/sources.ts";
export { type Batch, type Loader, makeLoader } from "./data/loader.ts";

// Stage: multicrop
export {
  collateCrops,
  defaultMulticropConfig,
  evalPrepare,
  evalTransform,
  MulticropConfig,
  multicropPrepare,
  multicropSample,
  multicropStage,
  smallImageProfile,
} from "./stages/multicrop.ts";

// Stage: encode (ResNet backbone per resolution group, projection head, prototypes)
export { checkFitsBackend, encodeStage, ModelTooLarge } from "./stages/encode.ts";
export {
  disposeModel,
  estimateMemory,
  loadModelArrays,
  makeSwavModel,
  ModelConfig,
  modelForward,
  ModelWeightsError,
  type NamedArray,
  readModelArrays,
  scopedSwavModel,
  type SwavModel,
  trainableVariables,
} from "./models/model.ts";
export { backboneForward } from "./models/resnet.ts";
export { l2NormaliseRows, normalisePrototypes, prototypeScores } from "./models/prototypes.ts";

// Stage: sinkhorn
export { SinkhornConfig, type SinkhornInput, sinkhornKnopp, sinkhornStage } from "./stages/sinkhorn.ts";
export { withoutGradient } from "./backend/no_gradient.ts";

// Stage: swappedLoss (and the composed one-call form)
export {
  assignmentCodes,
  SwappedLossConfig,
  swappedLossFromCodes,
  swappedLossStage,
  swappedPredictionLoss,
} from "./stages/swapped_loss.ts";

// Stage: optimise (LARC-SGD, warm-up + cosine schedule)
export {
  LarcSgd,
  learningRateAt,
  makeLarcSgd,
  OptimiseConfig,
  optimiseStage,
  scheduleFromEpochs,
} from "./stages/optimise.ts";

// State with an owner: the embedding queue
export {
  createQueue,
  type EmbeddingQueue,
  isFull as queueIsFull,
  makeQueue,
  push as pushQueue,
  queueScores,
} from "./state/queue.ts";

// Pipelines
export { decodeRunConfig, loadRunConfig, RunConfig, type RunConfigInput } from "./config/config.ts";
export {
  NonFiniteState,
  pretrain,
  type PretrainOptions,
  RunFolderBusy,
  RunFolderUnusable,
} from "./pipelines/pretrain.ts";
export {
  forwardBackward,
  NonFiniteLoss,
  type SwavStages,
  swavStages,
  swavTape,
  swavTrainStep,
} from "./pipelines/swav_step.ts";
// Methods: each one value of the generic step (a user's own is one more)
export {
  gradientsOf,
  type Method,
  type StepInput,
  type StepState,
  trainStep,
} from "./pipelines/train_step.ts";
export { type CustomMethod } from "./pipelines/methods.ts";
export { deepClusterV2Method } from "./pipelines/deepclusterv2.ts";
export { simclrMethod } from "./pipelines/simclr.ts";
export { ntXent, ntXentStage } from "./stages/nt_xent.ts";
export { clusterLoss, clusterLossStage } from "./stages/cluster_loss.ts";
export { sphericalKmeans } from "./stages/kmeans.ts";
export { extractFeatures } from "./pipelines/extract.ts";
export { knnClassify, knnTop1 } from "./pipelines/knn.ts";
export { evaluate, type Evaluation, EvaluationError, loadForEvaluation } from "./pipelines/evaluate.ts";
export { extractToFolder } from "./pipelines/extract_folder.ts";
export { trainLinearProbe } from "./pipelines/linear_probe.ts";
export { linearEvaluation } from "./pipelines/linear_eval.ts";
export { selectLabelSubset, semisupEvaluation } from "./pipelines/semisup.ts";
export { evalResizeFor, trainCrop } from "./data/eval_augment.ts";
export { EncoderError, exportEncoder, loadEncoder } from "./pipelines/export.ts";
export { decodeNpy, encodeNpy, NpyError, readNpy, writeNpy } from "./data/npy.ts";
export { readCheckpoint, resolveCheckpointPath, writeCheckpoint } from "./pipelines/checkpoint.ts";

// Randomness keyed by (seed, epoch, sample index)
export { type Rng, rngFor, rngFromState } from "./data/rng.ts";
