/**
 * One config for a whole run, composed of each stage's own schema. A JSON file
 * gives any subset; every missing field takes its default; command-line flags
 * override the file. A wrong field fails with a message that names it and
 * says what is allowed. The resolved config (every default filled in) is
 * written to the run folder.
 */
import { Effect, Schema } from "effect";
import { PrecisionChoice } from "../backend/precision.ts";
import { BackendName } from "../backend/tensor_backend.ts";
import { readRegularText } from "../data/bounded_read.ts";
import { ModelConfig } from "../models/model.ts";
import type { BackendName as BackendNameType } from "../backend/tensor_backend.ts";
import { MulticropConfig } from "../stages/multicrop.ts";
import { NonNegativeInt, Positive, PositiveInt, withDefault } from "../models/schema.ts";
import { freezeFields, larcFields, scheduleFields } from "../stages/optimise.ts";
import { sinkhornFields } from "../stages/sinkhorn.ts";
import { swappedLossFields } from "../stages/swapped_loss.ts";
import { RecipeInfo } from "./recipes.ts";

/** Where the images come from. */
export const DataConfig: Schema.Codec<DataConfig, Partial<DataConfig>> = Schema.Struct({
  /** A SOURCE: IDX folder, CIFAR folder, image folder (class subfolders, optional train/val), flat folder; `:train`/`:test` picks a split. */
  source: withDefault(Schema.String, "builtin:demo"),
  /** The labelled split used by kNN checks during training and by `eval` by default (defaults to the source's test split). */
  testSource: Schema.optionalKey(Schema.String),
  /** Encoder input channels: 1 for grey data sets (IDX picks 1 by itself), else 3. */
  channels: Schema.optionalKey(Schema.Literals([1, 3])),
  /** What to do with an unreadable or corrupt image: skip it (counted and reported) or stop. */
  onError: withDefault(Schema.Literals(["skip", "fail"]), "skip"),
  /** Worker threads that decode and augment (0 = on the main thread). */
  workers: withDefault(NonNegativeInt, 1),
  /** Prepared batches buffered ahead of the training step (backpressure bound). */
  prefetch: withDefault(PositiveInt, 2),
});

/**
 * The SwAV objective: the swappedLoss and sinkhorn stages' settings, the queue's,
 * and the optimise stage's prototype freezing (one schema per setting, defined
 * where it is used).
 */
export const SwavConfig: Schema.Codec<SwavConfig, Partial<SwavConfig>> = Schema.Struct({
  temperature: swappedLossFields.temperature,
  ...sinkhornFields,
  cropsForAssign: swappedLossFields.cropsForAssign,
  /** Queue rows per assignment crop (rounded down to a multiple of the batch); 0 = no queue. */
  queueLength: withDefault(NonNegativeInt, 0),
  /** Epoch at which the queue is created (the reference's epoch_queue_starts). */
  queueStartEpoch: withDefault(NonNegativeInt, 15),
  ...freezeFields,
});

/**
 * DeepCluster-v2 (main_deepclusterv2.py): the targets are each sample's cluster from a spherical k-means
 * over a memory bank of the last epoch's embeddings, one k-means per prototype head (model.prototypes:
 * a list of K per head; a number K means three heads of K).
 */
export const DeepClusterV2Config: Schema.Codec<DeepClusterV2Config, Partial<DeepClusterV2Config>> = Schema
  .Struct({
    /** Softmax temperature of the cross-entropy to the targets. */
    temperature: withDefault(Positive, 0.1),
    /** The crops whose embeddings the memory bank keeps; head h clusters bank h mod the list's length. */
    cropsForAssign: withDefault(Schema.Array(NonNegativeInt).check(Schema.isMinLength(1)), [0, 1]),
    /** k-means update steps per head at each epoch start (a final assignment follows). */
    kmeansIterations: withDefault(PositiveInt, 10),
    /** Iterations during which the prototypes (the centroids) are held still: the reference's 1e10, the whole run. */
    freezePrototypesIters: withDefault(NonNegativeInt, 1e10),
  });

/** SimCLR (NT-Xent over every crop, solo-learn's multi-crop form). */
export const SimclrConfig: Schema.Codec<SimclrConfig, Partial<SimclrConfig>> = Schema.Struct({
  temperature: withDefault(Positive, 0.1),
});

/** The training methods: SwAV (the default), DeepCluster-v2, SimCLR. */
export const MethodName = Schema.Literals(["swav", "deepclusterv2", "simclr"]);
export type MethodName = typeof MethodName.Type;

/** DeepCluster-v2's heads when model.prototypes is one number. */
export const DEEPCLUSTER_HEADS = 3;

/** The optimise stage's schedule and LARC-SGD settings. */
export const OptimConfig: Schema.Codec<OptimConfig, Partial<OptimConfig>> = Schema.Struct({
  ...scheduleFields,
  ...larcFields,
  /**
   * "none": the rates are used as given. "linear": baseLr, finalLr and startWarmup are per 256 images,
   * multiplied by the global batch (train.batchSize, which --procs N splits over the ranks) / 256 (Goyal et al.'s rule).
   */
  lrScaling: withDefault(Schema.Literals(["none", "linear"]), "none"),
});

/** The optim section's schedule and LARC settings with `lrScaling` applied for a global batch. */
export const effectiveOptim = (optim: OptimConfig, globalBatch: number) => {
  const { lrScaling, ...rest } = optim;
  const factor = lrScaling === "linear" ? globalBatch / 256 : 1;
  return {
    ...rest,
    baseLr: rest.baseLr * factor,
    finalLr: rest.finalLr * factor,
    startWarmup: rest.startWarmup * factor,
  };
};

/** The run: length, seed, outputs. */
export const TrainConfig: Schema.Codec<TrainConfig, Partial<TrainConfig>> = Schema.Struct({
  /** The objective: swav, deepclusterv2 or simclr; each reads its own section. */
  method: withDefault(MethodName, "swav"),
  epochs: withDefault(PositiveInt, 100),
  batchSize: withDefault(PositiveInt, 64),
  seed: withDefault(NonNegativeInt, 31),
  /** Run folder: resolved config, metrics.jsonl, checkpoints. */
  out: withDefault(Schema.String, "runs/swav"),
  backend: withDefault(BackendName, "auto"),
  /**
   * "bf16": convolutions in bfloat16 with fp32 accumulation and fp32 weights, statistics and losses
   * (where the processor runs bf16 natively; elsewhere fp32, said in one line). "auto": bf16 where native.
   * The run folder's config.json records the one that ran.
   */
  precision: withDefault(PrecisionChoice, "fp32"),
  /** Checkpoint every N steps (0 = only at the end of each epoch). */
  checkpointEvery: withDefault(NonNegativeInt, 0),
  /** Checkpoints kept in the run folder (older ones are removed). */
  keepCheckpoints: withDefault(PositiveInt, 3),
  /** kNN check on the labelled test split every N epochs (0 = never). */
  knnEvery: withDefault(NonNegativeInt, 0),
  knnK: withDefault(PositiveInt, 200),
  knnTemperature: withDefault(Positive, 0.1),
  /**
   * A linear classifier trained on the detached backbone features of each batch during pretraining
   * (labelled sources only); its test top-1 per epoch goes to epochs.jsonl (online_probe_top1).
   */
  onlineProbe: withDefault(Schema.Boolean, false),
  /** Stop after this many steps in total (0 = no limit): for tests and smoke runs. */
  maxSteps: withDefault(NonNegativeInt, 0),
});

/** A validated run config's `data` section: where the images come from and how they are read. */
export interface DataConfig {
  /** A SOURCE (default "builtin:demo"): IDX, CIFAR, image folder or flat folder; `:train` / `:test` picks a split. */
  readonly source: string;
  /** The labelled split of kNN checks and of `eval` by default (default: the source's test split). */
  readonly testSource?: string;
  /** Encoder input channels: 1 for grey data sets (IDX picks 1 by itself), else 3. */
  readonly channels?: 1 | 3;
  /** An unreadable or corrupt image is skipped (default, counted and reported) or stops the run. */
  readonly onError: "skip" | "fail";
  /** Worker threads that decode and augment (default 1; 0 = on the main thread). */
  readonly workers: number;
  /** Prepared batches buffered ahead of the training step (default 2). */
  readonly prefetch: number;
}

/** A validated run config's `swav` section: the swapped loss, Sinkhorn, the queue and the prototype freezing. */
export interface SwavConfig {
  /** Softmax temperature of the swapped prediction (default 0.1). */
  readonly temperature: number;
  /** Sinkhorn-Knopp entropic regularisation (default 0.05). */
  readonly epsilon: number;
  /** Sinkhorn-Knopp iterations (default 3). */
  readonly sinkhornIterations: number;
  /** Crops whose codes are predicted (default [0, 1]). */
  readonly cropsForAssign: readonly number[];
  /** Queue rows per assignment crop, rounded down to a multiple of the batch (default 0: no queue). */
  readonly queueLength: number;
  /** Epoch at which the queue is created (default 15, the reference's epoch_queue_starts). */
  readonly queueStartEpoch: number;
  /** Iterations during which the prototypes are frozen (default 313). */
  readonly freezePrototypesIters: number;
}

/** A validated run config's `deepclusterv2` section (used when `train.method` is "deepclusterv2"). */
export interface DeepClusterV2Config {
  /** Softmax temperature of the cross-entropy to the targets (default 0.1). */
  readonly temperature: number;
  /** The crops whose embeddings the memory bank keeps (default [0, 1]). */
  readonly cropsForAssign: readonly number[];
  /** k-means update steps per head at each epoch start (default 10). */
  readonly kmeansIterations: number;
  /** Iterations during which the prototypes (the centroids) are held still (default 1e10: the whole run). */
  readonly freezePrototypesIters: number;
}

/** A validated run config's `simclr` section (used when `train.method` is "simclr"). */
export interface SimclrConfig {
  /** NT-Xent temperature (default 0.1). */
  readonly temperature: number;
}

/** A validated run config's `optim` section: the learning-rate schedule and LARC-SGD. */
export interface OptimConfig {
  /** Learning rate after the warm-up (default 0.6). */
  readonly baseLr: number;
  /** Learning rate the cosine decay ends at (default 0.0006). */
  readonly finalLr: number;
  /** Learning rate the linear warm-up starts from (default 0). */
  readonly startWarmup: number;
  /** Warm-up length in epochs (default 0). */
  readonly warmupEpochs: number;
  /** SGD momentum (default 0.9). */
  readonly momentum: number;
  /** SGD weight decay, absorbed by LARC (default 1e-6). */
  readonly weightDecay: number;
  /** LARC trust coefficient (default 0.001). */
  readonly trust: number;
  /** LARC eps (default 1e-8). */
  readonly eps: number;
  /** LARC clipping (default false). */
  readonly clip: boolean;
  /** "none" (default): rates as given; "linear": baseLr, finalLr and startWarmup are per 256 images. */
  readonly lrScaling: "none" | "linear";
}

/** A validated run config's `train` section: the method, the run's length, seed and outputs. */
export interface TrainConfig {
  /** The objective (default "swav"); each reads its own section. */
  readonly method: "swav" | "deepclusterv2" | "simclr";
  /** Epochs (default 100). */
  readonly epochs: number;
  /** Images per step, over all processes (default 64). */
  readonly batchSize: number;
  /** Seed of the initial weights, the shuffles and the crops (default 31). */
  readonly seed: number;
  /** Run folder: resolved config, metrics.jsonl, checkpoints (default "runs/swav"). */
  readonly out: string;
  /** The tensor backend (default "auto"). */
  readonly backend: BackendNameType;
  /** Convolution precision (default "fp32"; "bf16" and "auto" where the processor runs bf16 natively). */
  readonly precision: "fp32" | "bf16" | "auto";
  /** Checkpoint every N steps (default 0: only at the end of each epoch). */
  readonly checkpointEvery: number;
  /** Checkpoints kept in the run folder (default 3). */
  readonly keepCheckpoints: number;
  /** kNN check on the labelled test split every N epochs (default 0: never). */
  readonly knnEvery: number;
  /** kNN neighbours (default 200). */
  readonly knnK: number;
  /** kNN vote temperature (default 0.1). */
  readonly knnTemperature: number;
  /** A linear classifier trained online on the detached backbone features (default false). */
  readonly onlineProbe: boolean;
  /** Stop after this many steps in total (default 0: no limit). */
  readonly maxSteps: number;
}

/** A validated run config: every section, every default filled in (what the run folder's config.json holds). */
export interface RunConfig {
  /** The preset the run started from (`--recipe`), if any. */
  readonly recipe?: RecipeInfo;
  /** Where the images come from. */
  readonly data: DataConfig;
  /** The multi-crop augmentation. */
  readonly multicrop: MulticropConfig;
  /** The model's architecture. */
  readonly model: ModelConfig;
  /** SwAV's settings. */
  readonly swav: SwavConfig;
  /** DeepCluster-v2's settings. */
  readonly deepclusterv2: DeepClusterV2Config;
  /** SimCLR's settings. */
  readonly simclr: SimclrConfig;
  /** The schedule and the optimiser. */
  readonly optim: OptimConfig;
  /** The method and the run. */
  readonly train: TrainConfig;
}

/** A run config as a file or a caller gives it: any subset of each section (the rest takes the defaults). */
export type RunConfigInput = {
  readonly [Section in keyof RunConfig]?: Section extends "recipe" ? RecipeInfo : Partial<RunConfig[Section]>;
};

/** The run config's schema: validates every section (errors name the field) and fills the defaults. */
export const RunConfig: Schema.Codec<RunConfig, RunConfigInput> = Schema.Struct({
  /** The preset the run started from (`--recipe`), recorded for the run folder's config.json. */
  recipe: Schema.optionalKey(RecipeInfo),
  data: withDefault(DataConfig, {}),
  multicrop: withDefault(MulticropConfig, {}),
  model: withDefault(ModelConfig, {}),
  swav: withDefault(SwavConfig, {}),
  deepclusterv2: withDefault(DeepClusterV2Config, {}),
  simclr: withDefault(SimclrConfig, {}),
  optim: withDefault(OptimConfig, {}),
  train: withDefault(TrainConfig, {}),
});

/** A config that does not validate; the message names the field(s). */
export class InvalidConfig extends Schema.TaggedError<InvalidConfig>()("InvalidConfig", {
  source: Schema.String,
  message: Schema.String,
}) {}

/** Validates raw config (parsed JSON), filling every default; the prototype heads as the method needs. */
export const decodeRunConfig = (raw: unknown, source = "config"): Effect.Effect<RunConfig, InvalidConfig> =>
  Schema.decodeUnknownEffect(RunConfig)(raw, { errors: "all", onExcessProperty: "error" }).pipe(
    Effect.mapError((error) => new InvalidConfig({ source, message: `${source}: ${error.message}` })),
    Effect.flatMap((config) => withMethodHeads(config, source)),
  );

/**
 * The model's prototype heads as the method needs them: SwAV one head (a number), DeepCluster-v2 a
 * list (a number K becomes three heads of K, as the reference's default), SimCLR none (an empty list).
 */
const withMethodHeads = (config: RunConfig, source: string): Effect.Effect<RunConfig, InvalidConfig> => {
  const { prototypes } = config.model;
  switch (config.train.method) {
    case "swav":
      if (typeof prototypes === "number") return Effect.succeed(config);
      return Effect.fail(
        new InvalidConfig({
          source,
          message:
            `${source}: model.prototypes is a list [${prototypes}], but swav uses one prototype head: ` +
            `give one number, or use train.method deepclusterv2`,
        }),
      );
    case "deepclusterv2":
      if (typeof prototypes !== "number" && prototypes.length === 0) {
        return Effect.fail(
          new InvalidConfig({
            source,
            message: `${source}: model.prototypes is [], but deepclusterv2 needs at least one head: ` +
              `give a number (${DEEPCLUSTER_HEADS} heads of it) or a list`,
          }),
        );
      }
      {
        const crops = config.multicrop.nmbCrops.reduce((a, b) => a + b, 0);
        const outside = config.deepclusterv2.cropsForAssign.find((c) => c >= crops);
        if (outside !== undefined) {
          return Effect.fail(
            new InvalidConfig({
              source,
              message:
                `${source}: deepclusterv2.cropsForAssign names crop ${outside}, but multicrop.nmbCrops ` +
                `[${config.multicrop.nmbCrops}] gives crops 0..${crops - 1}: list existing crops, e.g. [0]`,
            }),
          );
        }
      }
      return Effect.succeed(
        typeof prototypes === "number"
          ? { ...config, model: { ...config.model, prototypes: Array(DEEPCLUSTER_HEADS).fill(prototypes) } }
          : config,
      );
    case "simclr":
      return Effect.succeed({ ...config, model: { ...config.model, prototypes: [] } });
  }
};

/** Reads and validates a JSON config file. */
export const loadRunConfig = (path: string): Effect.Effect<RunConfig, InvalidConfig> =>
  Effect.flatMap(readRawConfig(path), (raw) => decodeRunConfig(raw, path));

/** The largest config file read (a config is a few hundred bytes). */
const MAX_CONFIG_BYTES = 16 * 2 ** 20;

/** Reads a JSON config file without validating it (to merge flags and data defaults first). */
export const readRawConfig = (path: string): Effect.Effect<unknown, InvalidConfig> =>
  Effect.gen(function* () {
    const text = yield* readRegularText(path, MAX_CONFIG_BYTES).pipe(
      Effect.mapError((error) =>
        new InvalidConfig({ source: path, message: `cannot read config file ${path}: ${error.reason}` })
      ),
    );
    const raw = yield* Effect.try({
      try: () => JSON.parse(text) as unknown,
      catch: (error) =>
        new InvalidConfig({
          source: path,
          message: `${path} is not valid JSON: ${(error as Error).message}`,
        }),
    });
    // Flags merge into the file's object: anything else (an array, a number) would silently become {}.
    if (!isPlainObject(raw)) {
      return yield* new InvalidConfig({
        source: path,
        message: `${path} holds ${
          Array.isArray(raw) ? "an array" : raw === null ? "null" : `a ${typeof raw}`
        }: a config file must be one JSON object, e.g. { "train": { "epochs": 10 } }`,
      });
    }
    return raw;
  });

/** Deep-merges `override` into `base` (plain objects only; arrays and values replace). */
export const mergeConfig = (base: unknown, override: unknown): unknown => {
  if (!isPlainObject(override)) return override === undefined ? base : override;
  const out: Record<string, unknown> = isPlainObject(base) ? { ...base } : {};
  for (const [key, value] of Object.entries(override)) {
    if (value !== undefined) out[key] = mergeConfig(out[key], value);
  }
  return out;
};

const isPlainObject = (value: unknown): value is Record<string, unknown> =>
  typeof value === "object" && value !== null && !Array.isArray(value);
