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
import { MulticropConfig } from "../stages/multicrop.ts";
import { NonNegativeInt, Positive, PositiveInt, withDefault } from "../models/schema.ts";
import { freezeFields, larcFields, scheduleFields } from "../stages/optimise.ts";
import { sinkhornFields } from "../stages/sinkhorn.ts";
import { swappedLossFields } from "../stages/swapped_loss.ts";
import { RecipeInfo } from "./recipes.ts";

/** Where the images come from. */
export const DataConfig = Schema.Struct({
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
export const SwavConfig = Schema.Struct({
  temperature: swappedLossFields.temperature,
  ...sinkhornFields,
  cropsForAssign: swappedLossFields.cropsForAssign,
  /** Queue rows per assignment crop (rounded down to a multiple of the batch); 0 = no queue. */
  queueLength: withDefault(NonNegativeInt, 0),
  /** Epoch at which the queue is created (the reference's epoch_queue_starts). */
  queueStartEpoch: withDefault(NonNegativeInt, 15),
  ...freezeFields,
});
export type SwavConfig = typeof SwavConfig.Type;

/**
 * DeepCluster-v2 (main_deepclusterv2.py): the targets are each sample's cluster from a spherical k-means
 * over a memory bank of the last epoch's embeddings, one k-means per prototype head (model.prototypes:
 * a list of K per head; a number K means three heads of K).
 */
export const DeepClusterV2Config = Schema.Struct({
  /** Softmax temperature of the cross-entropy to the targets. */
  temperature: withDefault(Positive, 0.1),
  /** The crops whose embeddings the memory bank keeps; head h clusters bank h mod the list's length. */
  cropsForAssign: withDefault(Schema.Array(NonNegativeInt).check(Schema.isMinLength(1)), [0, 1]),
  /** k-means update steps per head at each epoch start (a final assignment follows). */
  kmeansIterations: withDefault(PositiveInt, 10),
  /** Iterations during which the prototypes (the centroids) are held still: the reference's 1e10, the whole run. */
  freezePrototypesIters: withDefault(NonNegativeInt, 1e10),
});
export type DeepClusterV2Config = typeof DeepClusterV2Config.Type;

/** SimCLR (NT-Xent over every crop, solo-learn's multi-crop form). */
export const SimclrConfig = Schema.Struct({
  temperature: withDefault(Positive, 0.1),
});
export type SimclrConfig = typeof SimclrConfig.Type;

/** The training methods: SwAV (the default), DeepCluster-v2, SimCLR. */
export const MethodName = Schema.Literals(["swav", "deepclusterv2", "simclr"]);
export type MethodName = typeof MethodName.Type;

/** DeepCluster-v2's heads when model.prototypes is one number. */
export const DEEPCLUSTER_HEADS = 3;

/** The optimise stage's schedule and LARC-SGD settings. */
export const OptimConfig = Schema.Struct({
  ...scheduleFields,
  ...larcFields,
  /**
   * "none": the rates are used as given. "linear": baseLr, finalLr and startWarmup are per 256 images,
   * multiplied by the global batch (train.batchSize, which --procs N splits over the ranks) / 256 (Goyal et al.'s rule).
   */
  lrScaling: withDefault(Schema.Literals(["none", "linear"]), "none"),
});
export type OptimConfig = typeof OptimConfig.Type;

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
export const TrainConfig = Schema.Struct({
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

export const RunConfig = Schema.Struct({
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
export type RunConfig = typeof RunConfig.Type;
export type RunConfigInput = typeof RunConfig.Encoded;

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
