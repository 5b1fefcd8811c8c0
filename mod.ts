/**
 * swav-ts: SwAV self-supervised image representation learning (Caron et al. 2020)
 * on Deno with TensorFlow.js and Effect, with DeepCluster-v2 and SimCLR as
 * further methods of the same training step.
 *
 * The exports are grouped by what a user does. Where to start:
 *
 * - train: `pretrain` with a `RunConfig` (`decodeRunConfig`, `loadRunConfig`),
 *   provided a `TensorBackend`;
 * - measure: `evaluate` (kNN, linear, semi-supervised), or `extractFeatures`
 *   and `knnClassify` / `trainLinearProbe` on your own features;
 * - reuse: `exportEncoder` / `loadEncoder`, `loadForEvaluation` for a checkpoint
 *   or run folder, `buildReport` for a run's HTML report;
 * - change the method: a stage value of the same types (`SwavStages`), or a
 *   whole `Method` (`CustomMethod`).
 *
 * Every example in this reference runs (`deno test --doc`) in seconds on tiny data.
 * @module
 */

// Stages: each step of a pipeline as a value (a name, a validated config, the work); compose them with
// `configure` and `andThen`, or swap one for another of the same types.
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
export { type CropLayout, CropLayoutError } from "./stages/crop_layout.ts";
export { DecodeConfig, DecodeErrorPolicy, decodeStage, type EncodedImage } from "./stages/decode.ts";
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
export {
  checkFitsBackend,
  EncodeConfig,
  type EncodeInput,
  type EncodeOutput,
  encodeStage,
  ModelTooLarge,
} from "./stages/encode.ts";
export { SinkhornConfig, type SinkhornInput, sinkhornKnopp, sinkhornStage } from "./stages/sinkhorn.ts";
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
export {
  LarcSgd,
  type LarcSgdOptions,
  learningRateAt,
  makeLarcSgd,
  OptimiseConfig,
  type OptimiseInput,
  type OptimiseOutput,
  optimiseStage,
  scheduleFromEpochs,
  type SerialisedSlots,
} from "./stages/optimise.ts";
export { ntXent, NtXentConfig, type NtXentInput, ntXentStage } from "./stages/nt_xent.ts";
export {
  clusterLoss,
  ClusterLossConfig,
  type ClusterLossInput,
  clusterLossStage,
} from "./stages/cluster_loss.ts";
export { type KmeansInput, type KmeansOutput, sphericalKmeans, TooFewRows } from "./stages/kmeans.ts";
export {
  detached,
  onOneTape,
  onTape,
  type TapeForward,
  type TapeInput,
  type TapeOutputs,
  type VariableGrads,
} from "./stages/tape.ts";
export { withoutGradient } from "./backend/no_gradient.ts";

// Methods: one training step over a `Method` value (SwAV, DeepCluster-v2, SimCLR, or your own).
export {
  gradientsOf,
  type Method,
  NonFiniteLoss,
  NonFiniteState,
  type StepInput,
  type StepOutcome,
  type StepSettings,
  type StepState,
  type StepStatistics,
  trainStep,
} from "./pipelines/train_step.ts";
export {
  forwardBackward,
  swavMethod,
  type SwavStages,
  swavStages,
  type SwavTape,
  swavTape,
  swavTrainStep,
} from "./pipelines/swav_step.ts";
export { deepClusterV2Method } from "./pipelines/deepclusterv2.ts";
export { simclrMethod } from "./pipelines/simclr.ts";
export { type CustomMethod } from "./pipelines/methods.ts";

// Pipelines: whole runs from a run config: pretraining, evaluation, features, export.
export {
  type DataConfig,
  decodeRunConfig,
  type DeepClusterV2Config,
  InvalidConfig,
  loadRunConfig,
  type OptimConfig,
  RunConfig,
  type RunConfigInput,
  type SimclrConfig,
  type SwavConfig,
  type TrainConfig,
} from "./config/config.ts";
export { type RecipeInfo } from "./config/recipes.ts";
export {
  BankTooSmall,
  CheckpointMismatch,
  DataParallelError,
  DatasetTooSmall,
  type EpochReport,
  NoTrainingBatch,
  pretrain,
  type PretrainError,
  type PretrainHooks,
  type PretrainOptions,
  type PretrainResult,
  QueueError,
  ResumeWithForce,
  RunFolderBusy,
  RunFolderHoldsRun,
  RunFolderUnusable,
  RunRecordError,
  type StepMetrics,
} from "./pipelines/pretrain.ts";
export {
  type EvalMethod,
  evaluate,
  type EvaluatedSources,
  type EvaluateError,
  type EvaluateOptions,
  type Evaluation,
  EvaluationError,
  type KnnEvaluation,
  type LinearEvaluation,
  type LinearProtocol,
  type LoadedEncoder,
  loadForEvaluation,
  type LoadForEvaluationError,
  type OnWarning,
  type ResizeOption,
  type SemisupEvaluation,
} from "./pipelines/evaluate.ts";
export {
  extractFeatures,
  type ExtractFeaturesError,
  type ExtractOptions,
  type Features,
} from "./pipelines/extract.ts";
export { extractToFolder, type ExtractToFolderError } from "./pipelines/extract_folder.ts";
// loadForEvaluation's failures on a torch checkpoint (torch.save zip, or its weights do not map).
export { TorchCheckpointError } from "./data/torch_checkpoint.ts";
export { TorchWeightsError } from "./models/torch_names.ts";
export {
  EvaluationInputError,
  knnClassify,
  type KnnOptions,
  type KnnResult,
  knnTop1,
} from "./pipelines/knn.ts";
export {
  linearProbeDefaults,
  type LinearProbeOptions,
  type LinearProbeResult,
  type ProbeEpoch,
  trainLinearProbe,
} from "./pipelines/linear_probe.ts";
export {
  type ImageEvaluation,
  type ImageEvaluationError,
  linearEvaluation,
  type Pooling,
} from "./pipelines/linear_eval.ts";
export { selectLabelSubset, semisupEvaluation } from "./pipelines/semisup.ts";
export { EncoderError, type EncoderInput, exportEncoder, loadEncoder } from "./pipelines/export.ts";

// Data: data sets (`SOURCE` specs), the loader that batches and augments them, images and NumPy files.
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
export { resolveSourceSpec } from "./pipelines/sources.ts";
export { type DemoDatasetOptions, writeDemoDataset } from "./data/demo_dataset.ts";
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
export { DecodeError, decodeImage, type JpegDecoder, type RgbImage } from "./data/image_codec.ts";
export { evalResizeFor, trainCrop } from "./data/eval_augment.ts";
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
export { type Rng, rngFor, rngFromState } from "./data/rng.ts";

// Models: the ResNet backbone, projection head and prototypes as named variables, and the state a
// method keeps (SwAV's queue, DeepCluster-v2's memory bank).
export {
  disposeModel,
  estimateMemory,
  makeSwavModel,
  ModelConfig,
  modelForward,
  ModelWeightsError,
  type NamedVariable,
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
export { makeMemoryBank, type MemoryBank } from "./state/memory_bank.ts";

// Checkpoints: one file per checkpoint, written atomically, read back verified; the model's arrays.
export {
  type Checkpoint,
  CheckpointError,
  readCheckpoint,
  resolveCheckpointPath,
  writeCheckpoint,
} from "./pipelines/checkpoint.ts";
export { loadModelArrays, type NamedArray, readModelArrays } from "./models/model.ts";

// Reporting: a run folder's HTML report (curves, warnings, model views, evaluations).
export { buildReport, type BuildReportError, type RenderOptions } from "./pipelines/report_html.ts";
export { type ViewOptions } from "./pipelines/run_report.ts";

// Backend and tensors: the TF.js backend as an Effect service, kernel settings, tensor ownership.
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
