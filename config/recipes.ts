/**
 * Recipe presets (`pretrain --recipe NAME`): complete run configs named after
 * the SwAV reference's scripts (facebookresearch/swav scripts/*.sh), plus one
 * for CPU-sized data sets. A preset is raw config: a `--config` file merges
 * over it and flags over that; data-dependent defaults fill what it leaves out.
 *
 * Batch size and worker count are the reference's: `train.batchSize` is per
 * worker (process), and the learning rates are given per 256 images with
 * `optim.lrScaling: "linear"` (lr x global batch / 256), so the preset runs
 * the script's rates at the script's scale (64 workers x 64 = 4096 images:
 * 0.3 x 16 = 4.8) and scales them linearly on fewer workers (one process of 64:
 * 4.8 x 64/4096 = 0.075).
 *
 * `--epochs E` rescales the schedule in proportion to E / the preset's epochs:
 * warm-up epochs, the queue's start epoch and the prototype-freezing
 * iterations (the last two rounded to whole numbers).
 */
import { Schema } from "effect";

/** What a preset records about itself in the run's config.json (the `recipe` section). */
export interface RecipeInfo {
  /** The preset's name, as given to `--recipe`. */
  readonly name: string;
  /** The reference script it transcribes, or "" for this project's own presets. */
  readonly script: string;
  /** Processes the reference ran (its global batch is workers x train.batchSize). */
  readonly referenceWorkers: number;
  /** The preset's own length: `--epochs` rescales the schedule by epochs / referenceEpochs. */
  readonly referenceEpochs: number;
  /** The reference's arithmetic ("fp16" with apex/AMP); swav-ts always trains in float32. */
  readonly referencePrecision: "fp16" | "fp32";
  /** Whether the reference synchronised batch norm across workers (its --sync_bn). */
  readonly referenceSyncBatchNorm: boolean;
  /** The factor `--epochs` applied to the schedule (1 when the preset's own length is kept). */
  readonly epochScale: number;
}

/** The `recipe` section's schema. */
export const RecipeInfo: Schema.Codec<RecipeInfo> = Schema.Struct({
  /** The preset's name, as given to `--recipe`. */
  name: Schema.String,
  /** The reference script it transcribes, or "" for this project's own presets. */
  script: Schema.String,
  /** Processes the reference ran (its global batch is workers x train.batchSize). */
  referenceWorkers: Schema.Number,
  /** The preset's own length: `--epochs` rescales the schedule by epochs / referenceEpochs. */
  referenceEpochs: Schema.Number,
  /** The reference's arithmetic ("fp16" with apex/AMP); swav-ts always trains in float32. */
  referencePrecision: Schema.Literals(["fp16", "fp32"]),
  /** Whether the reference synchronised batch norm across workers (its --sync_bn). */
  referenceSyncBatchNorm: Schema.Boolean,
  /** The factor `--epochs` applied to the schedule (1 when the preset's own length is kept). */
  epochScale: Schema.Number,
});

export const RECIPE_NAMES = [
  "swav_800ep_pretrain",
  "swav_400ep_pretrain",
  "swav_400ep_bs256_pretrain",
  "small-data",
] as const;
export type RecipeName = typeof RECIPE_NAMES[number];

/** The multi-crop of every reference script: 2 x 224 (0.14, 1) + 6 x 96 (0.05, 0.14), ImageNet augmentations. */
const referenceMulticrop = {
  nmbCrops: [2, 6],
  sizeCrops: [224, 96],
  minScaleCrops: [0.14, 0.05],
  maxScaleCrops: [1, 0.14],
};

const referenceModel = {
  arch: "resnet50",
  width: 64,
  stem: "imagenet",
  hidden: 2048,
  out: 128,
  prototypes: 3000,
  syncBatchNorm: true,
};

const referenceSwav = { temperature: 0.1, epsilon: 0.05, sinkhornIterations: 3, cropsForAssign: [0, 1] };

/** swav_800ep_pretrain.sh / swav_400ep_pretrain.sh: 64 workers x 64, lr 4.8 -> 0.0048, 10 warm-up epochs from 0.3. */
const largeBatch = (epochs: number, name: RecipeName) => ({
  recipe: {
    name,
    script: `scripts/${name}.sh`,
    referenceWorkers: 64,
    referenceEpochs: epochs,
    referencePrecision: "fp16",
    // The scripts' --sync_bn apex: model.syncBatchNorm (on whenever several processes train).
    referenceSyncBatchNorm: true,
    epochScale: 1,
  },
  multicrop: referenceMulticrop,
  model: referenceModel,
  swav: { ...referenceSwav, queueLength: 0, queueStartEpoch: 15, freezePrototypesIters: 313 },
  // Per 256 images: x 4096/256 = 16 at the reference's scale gives 4.8 -> 0.0048 from 0.3.
  optim: {
    lrScaling: "linear",
    baseLr: 4.8 / 16,
    finalLr: 0.0048 / 16,
    startWarmup: 0.3 / 16,
    warmupEpochs: 10,
    momentum: 0.9,
    weightDecay: 1e-6,
    trust: 0.001,
  },
  train: { epochs, batchSize: 64 },
});

const presets: Record<RecipeName, Record<string, unknown>> = {
  swav_800ep_pretrain: largeBatch(800, "swav_800ep_pretrain"),
  swav_400ep_pretrain: largeBatch(400, "swav_400ep_pretrain"),
  // swav_400ep_bs256_pretrain.sh: 4 workers x 64 = 256, lr 0.6 -> 0.0006, no warm-up, prototypes frozen for
  // 5005 iterations (about one ImageNet epoch), a queue of 3840 from epoch 15.
  swav_400ep_bs256_pretrain: {
    recipe: {
      name: "swav_400ep_bs256_pretrain",
      script: "scripts/swav_400ep_bs256_pretrain.sh",
      referenceWorkers: 4,
      referenceEpochs: 400,
      referencePrecision: "fp16",
      // The script's --sync_bn pytorch: model.syncBatchNorm (on whenever several processes train).
      referenceSyncBatchNorm: true,
      epochScale: 1,
    },
    multicrop: referenceMulticrop,
    model: referenceModel,
    swav: { ...referenceSwav, queueLength: 3840, queueStartEpoch: 15, freezePrototypesIters: 5005 },
    optim: {
      lrScaling: "linear",
      baseLr: 0.6,
      finalLr: 0.0006,
      startWarmup: 0,
      warmupEpochs: 0,
      momentum: 0.9,
      weightDecay: 1e-6,
      trust: 0.001,
    },
    train: { epochs: 400, batchSize: 64 },
  },
  // CPU-sized labelled sets of small images (Fashion-MNIST, CIFAR): a ResNet-18 of width 32 with the 3x3
  // stem, 2 crops at the images' own side (filled from the data), colour jitter 0.4, no blur, batch 256,
  // LARC trust 0.02, one warm-up epoch, prototypes frozen for the first 234 iterations (one Fashion-MNIST
  // epoch at 256), 10 x classes prototypes (the small-data rule), no queue. Tuned for 6 epochs on
  // Fashion-MNIST (BENCHMARKS.md, issue 14): width 32 is what took its kNN above raw pixels' (width 16,
  // batch 128 and 14-pixel multi-crop did not).
  "small-data": {
    recipe: {
      name: "small-data",
      script: "",
      referenceWorkers: 1,
      referenceEpochs: 6,
      referencePrecision: "fp32",
      referenceSyncBatchNorm: false,
      epochScale: 1,
    },
    multicrop: {
      nmbCrops: [2],
      // Replaced by the images' own shorter side where the source tells it (config/data_defaults.ts).
      sizeCrops: [32],
      minScaleCrops: [0.2],
      maxScaleCrops: [1],
      brightness: 0.4,
      contrast: 0.4,
      saturation: 0.4,
      hue: 0.1,
      jitterProbability: 0.8,
      grayscaleProbability: 0.2,
      blur: false,
    },
    model: { arch: "resnet18", width: 32, stem: "cifar", hidden: 512, out: 128 },
    swav: { ...referenceSwav, queueLength: 0, queueStartEpoch: 15, freezePrototypesIters: 234 },
    optim: {
      lrScaling: "linear",
      baseLr: 0.6,
      finalLr: 0.0006,
      startWarmup: 0,
      warmupEpochs: 1,
      momentum: 0.9,
      weightDecay: 1e-6,
      trust: 0.02,
    },
    train: { epochs: 6, batchSize: 256 },
  },
};

export const isRecipeName = (name: string): name is RecipeName =>
  (RECIPE_NAMES as readonly string[]).includes(name);

/**
 * The preset `name` as raw config, its schedule rescaled to `epochs` when given
 * (warm-up, queue start and prototype freezing in proportion).
 */
export const recipeConfig = (name: RecipeName, epochs?: number): Record<string, unknown> => {
  const preset = structuredClone(presets[name]) as {
    recipe: { referenceEpochs: number; epochScale: number };
    swav: { queueStartEpoch: number; freezePrototypesIters: number };
    optim: { warmupEpochs: number };
    train: { epochs: number };
  };
  if (epochs === undefined || epochs === preset.recipe.referenceEpochs) return preset;
  const scale = epochs / preset.recipe.referenceEpochs;
  preset.recipe.epochScale = scale;
  preset.train.epochs = epochs;
  preset.optim.warmupEpochs = preset.optim.warmupEpochs * scale;
  preset.swav.queueStartEpoch = Math.round(preset.swav.queueStartEpoch * scale);
  preset.swav.freezePrototypesIters = Math.round(preset.swav.freezePrototypesIters * scale);
  return preset;
};
