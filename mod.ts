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
export type { Communicator, ReduceOp } from "./backend/communicator.ts";
export type { NamedTensorMap, Scalar, Tensor, Tensor2D, Tensor4D, Variable } from "./backend/tensor_types.ts";

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
export { DecodeError, decodeImage, type JpegDecoder, type RgbImage } from "./data/image_codec.ts";
export { DecodeConfig, DecodeErrorPolicy, decodeStage, type EncodedImage } from "./stages/decode.ts";
export {
  type DataSource,
  openSource,
  parseSourceSpec,
  type RawSample,
  type Sample,
  SourceError,
  type SourceKind,
  type Split,
} from "./data/sources.ts";
export { type DemoDatasetOptions, writeDemoDataset } from "./data/demo_dataset.ts";
export { resolveSourceSpec } from "./pipelines/sources.ts";
export {
  type Batch,
  type Loader,
  LoaderError,
  type LoaderOptions,
  makeLoader,
  type PrepareRef,
  type SkippedSample,
  type SkipReport,
} from "./data/loader.ts";

// Stage: multicrop
export {
  collateCrops,
  defaultMulticropConfig,
  evalPrepare,
  evalTransform,
  MulticropConfig,
  type MulticropInput,
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
export {
  type BackboneConfig,
  backboneForward,
  type BackbonePlan,
  type BlockPlan,
  type ForwardOptions,
  type ResnetArch,
  type ResnetStem,
} from "./models/resnet.ts";
export { l2NormaliseRows, normalisePrototypes, prototypeScores } from "./models/prototypes.ts";

// Stage: sinkhorn
export { SinkhornConfig, type SinkhornInput, sinkhornKnopp, sinkhornStage } from "./stages/sinkhorn.ts";
export { withoutGradient } from "./backend/no_gradient.ts";

// Stage: swappedLoss (and the composed one-call form)
export {
  assignmentCodes,
  type AssignmentOptions,
  SwappedLossConfig,
  swappedLossFromCodes,
  type SwappedLossInput,
  type SwappedLossOptions,
  swappedLossStage,
  swappedPredictionLoss,
  type SwappedPredictionOptions,
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
  type QueueOptions,
  queueScores,
  type QueueState,
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
export {
  type EvalMethod,
  evaluate,
  type EvaluatedSources,
  type EvaluateOptions,
  type Evaluation,
  EvaluationError,
  type KnnEvaluation,
  type LinearEvaluation,
  type LinearProtocol,
  type LoadedEncoder,
  loadForEvaluation,
  type OnWarning,
  type ResizeOption,
  type SemisupEvaluation,
} from "./pipelines/evaluate.ts";
export { type ImageEvaluation, type Pooling } from "./pipelines/linear_eval.ts";
export { type ProbeEpoch } from "./pipelines/linear_probe.ts";
export { extractToFolder } from "./pipelines/extract_folder.ts";
export {
  linearProbeDefaults,
  type LinearProbeOptions,
  type LinearProbeResult,
  trainLinearProbe,
} from "./pipelines/linear_probe.ts";
export { linearEvaluation } from "./pipelines/linear_eval.ts";
export { selectLabelSubset, semisupEvaluation } from "./pipelines/semisup.ts";
export { evalResizeFor, trainCrop } from "./data/eval_augment.ts";
export { EncoderError, type EncoderInput, exportEncoder, loadEncoder } from "./pipelines/export.ts";
export {
  decodeNpy,
  encodeNpy,
  type NpyArray,
  type NpyDtype,
  NpyError,
  type NpyValues,
  readNpy,
  writeNpy,
} from "./data/npy.ts";
export { readCheckpoint, resolveCheckpointPath, writeCheckpoint } from "./pipelines/checkpoint.ts";

// Randomness keyed by (seed, epoch, sample index)
export { type Rng, rngFor, rngFromState } from "./data/rng.ts";
