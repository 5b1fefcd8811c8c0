/**
 * multicrop stage: one image to SwAV's multi-resolution crops.
 *
 * Per crop, in the order of the SwAV reference (src/multicropdataset.py):
 * RandomResizedCrop -> RandomHorizontalFlip -> RandomApply(ColorJitter, p)
 * -> RandomGrayscale(p) -> RandomApply(GaussianBlur, p) -> ToTensor -> Normalize.
 *
 * The reference runs crop, flip, jitter, grayscale and blur on PIL uint8
 * images and converts to float last. Here every step after the crop works on
 * float32 values in [0, 1] with torchvision's tensor semantics (see
 * `data/augment.ts`): the same maths without uint8 rounding between steps, and
 * a true Gaussian blur with sigma equal to the reference's PIL blur radius.
 *
 * All randomness of a sample comes from the `Rng` passed in, which the caller
 * keys by (seed, epoch, sample index): the crops of a sample do not depend on
 * the order or the concurrency in which samples are prepared.
 *
 * Output layout: `multicropSample` returns one HWC float32 array per crop,
 * group by group (all crops of size group 0, then group 1, ...);
 * `collateCrops` stacks a batch of samples into one tensor per size group,
 * crop-major (rows [v*B, (v+1)*B) are crop v of the group), as `encode` takes.
 */
import * as tf from "@tensorflow/tfjs";
import { Effect, Schema } from "effect";
import {
  colorJitter,
  type ColorJitterParams,
  type CropBox,
  cropResize,
  gaussianBlur,
  normalizeInto,
  pythonRound,
  randomResizedCropParams,
  rgbToGrayscale,
  sampleColorJitter,
} from "../data/augment.ts";
import type { PrepareRef } from "../data/loader.ts";
import { type Rng, rngFor } from "../data/rng.ts";
import type { RgbImage } from "../data/image_codec.ts";
import { defineStage, type Stage } from "./stage.ts";
import { withDefault } from "../models/schema.ts";
import { kernelInvariant } from "../backend/invariant.ts";

const Probability = Schema.Finite.check(Schema.isBetween({ minimum: 0, maximum: 1 }));
const Strength = Schema.Finite.check(Schema.isGreaterThanOrEqualTo(0));
const PositiveInt = Schema.Int.check(Schema.isGreaterThanOrEqualTo(1));
const Pair = Schema.Tuple([Schema.Finite, Schema.Finite]);
const Triple = Schema.Tuple([Schema.Finite, Schema.Finite, Schema.Finite]);

const MulticropFields = Schema.Struct({
  /** Number of crops of each size group; the reference's default is [2, 6]. */
  nmbCrops: withDefault(Schema.Array(PositiveInt), [2, 6]),
  /** Side in pixels of the crops of each group (square crops). */
  sizeCrops: withDefault(Schema.Array(PositiveInt), [224, 96]),
  /** Lower end of each group's area fraction range (RandomResizedCrop scale). */
  minScaleCrops: withDefault(Schema.Array(Schema.Finite), [0.14, 0.05]),
  /** Upper end of each group's area fraction range. */
  maxScaleCrops: withDefault(Schema.Array(Schema.Finite), [1, 0.14]),
  /** Aspect ratio (width / height) range of RandomResizedCrop, sampled log-uniformly. */
  aspectRatio: withDefault(Pair, [3 / 4, 4 / 3]),
  /** Probability of a horizontal flip. */
  flipProbability: withDefault(Probability, 0.5),
  /** Colour jitter strengths, as torchvision's ColorJitter takes them (0 disables that op). */
  brightness: withDefault(Strength, 0.8),
  contrast: withDefault(Strength, 0.8),
  saturation: withDefault(Strength, 0.8),
  hue: withDefault(Schema.Finite.check(Schema.isBetween({ minimum: 0, maximum: 0.5 })), 0.2),
  /** Probability of applying the colour jitter. */
  jitterProbability: withDefault(Probability, 0.8),
  /** Probability of converting to grayscale (after the jitter). */
  grayscaleProbability: withDefault(Probability, 0.2),
  /** Whether to blur at all; the small-image profile turns it off. */
  blur: withDefault(Schema.Boolean, true),
  /** Probability of the Gaussian blur. */
  blurProbability: withDefault(Probability, 0.5),
  /** Range of the blur's sigma (the reference's PIL radius), sampled uniformly. */
  blurSigma: withDefault(Pair, [0.1, 2.0]),
  /** Per-channel normalisation: the SwAV reference's constants (src/multicropdataset.py: std 0.228, not torchvision's 0.229). */
  mean: withDefault(Triple, [0.485, 0.456, 0.406]),
  std: withDefault(Triple, [0.228, 0.224, 0.225]),
  /** Output channels: 3 (RGB) or 1 (luma of the final RGB, normalised with mean[0], std[0]). */
  channels: withDefault(Schema.Literals([1, 3]), 3),
});

/** Cross-field rules, each failure naming its field. */
const consistent = Schema.makeFilter((c: typeof MulticropFields.Type) => {
  const issues: Schema.FilterIssue[] = [];
  const groups = c.nmbCrops.length;
  if (groups === 0) issues.push({ path: ["nmbCrops"], issue: "nmbCrops must have at least one size group" });
  for (
    const [name, list] of [["sizeCrops", c.sizeCrops], ["minScaleCrops", c.minScaleCrops], [
      "maxScaleCrops",
      c.maxScaleCrops,
    ]] as const
  ) {
    if (list.length !== groups) {
      issues.push({
        path: [name],
        issue: `${name} has ${list.length} entries but nmbCrops has ${groups}: one per size group`,
      });
    }
  }
  for (let g = 0; g < Math.min(groups, c.minScaleCrops.length, c.maxScaleCrops.length); g++) {
    const low = c.minScaleCrops[g];
    const high = c.maxScaleCrops[g];
    if (!(low > 0 && low <= 1)) {
      issues.push({ path: ["minScaleCrops", g], issue: `scale must be in (0, 1], got ${low}` });
    }
    if (!(high > 0 && high <= 1)) {
      issues.push({ path: ["maxScaleCrops", g], issue: `scale must be in (0, 1], got ${high}` });
    }
    if (low > high) {
      issues.push({
        path: ["minScaleCrops", g],
        issue: `minScaleCrops[${g}] = ${low} exceeds maxScaleCrops[${g}] = ${high}`,
      });
    }
  }
  const [ratioLow, ratioHigh] = c.aspectRatio;
  if (!(ratioLow > 0 && ratioLow <= ratioHigh)) {
    issues.push({
      path: ["aspectRatio"],
      issue: `aspectRatio must satisfy 0 < low <= high, got [${ratioLow}, ${ratioHigh}]`,
    });
  }
  const [sigmaLow, sigmaHigh] = c.blurSigma;
  if (!(sigmaLow > 0 && sigmaLow <= sigmaHigh)) {
    issues.push({
      path: ["blurSigma"],
      issue: `blurSigma must satisfy 0 < low <= high, got [${sigmaLow}, ${sigmaHigh}]`,
    });
  }
  c.std.forEach((s, i) => {
    if (!(s > 0)) issues.push({ path: ["std", i], issue: `std must be > 0, got ${s}` });
  });
  return issues;
});

/** A validated multicrop config (defaults: the SwAV reference's 2 x 224 + 6 x 96 px recipe). */
export interface MulticropConfig {
  /** Number of crops of each size group (default [2, 6]). */
  readonly nmbCrops: readonly number[];
  /** Side in pixels of the crops of each group (default [224, 96]). */
  readonly sizeCrops: readonly number[];
  /** Lower end of each group's area fraction range, RandomResizedCrop's scale (default [0.14, 0.05]). */
  readonly minScaleCrops: readonly number[];
  /** Upper end of each group's area fraction range (default [1, 0.14]). */
  readonly maxScaleCrops: readonly number[];
  /** Aspect ratio (width / height) range, sampled log-uniformly (default [3/4, 4/3]). */
  readonly aspectRatio: readonly [number, number];
  /** Probability of a horizontal flip (default 0.5). */
  readonly flipProbability: number;
  /** Colour jitter brightness strength, as torchvision's ColorJitter takes it (default 0.8; 0 disables). */
  readonly brightness: number;
  /** Colour jitter contrast strength (default 0.8). */
  readonly contrast: number;
  /** Colour jitter saturation strength (default 0.8). */
  readonly saturation: number;
  /** Colour jitter hue strength, at most 0.5 (default 0.2). */
  readonly hue: number;
  /** Probability of applying the colour jitter (default 0.8). */
  readonly jitterProbability: number;
  /** Probability of converting to grayscale after the jitter (default 0.2). */
  readonly grayscaleProbability: number;
  /** Whether to blur at all (default true; the small-image profile turns it off). */
  readonly blur: boolean;
  /** Probability of the Gaussian blur (default 0.5). */
  readonly blurProbability: number;
  /** Range of the blur's sigma, sampled uniformly (default [0.1, 2]). */
  readonly blurSigma: readonly [number, number];
  /** Per-channel mean subtracted (default the reference's [0.485, 0.456, 0.406]). */
  readonly mean: readonly [number, number, number];
  /** Per-channel standard deviation divided by (default the reference's [0.228, 0.224, 0.225]). */
  readonly std: readonly [number, number, number];
  /** Output channels: 3 (RGB) or 1 (luma of the final RGB, normalised with mean[0], std[0]). */
  readonly channels: 1 | 3;
}

/** The multicrop stage's config schema: validates every field (errors name it) and fills the defaults. */
export const MulticropConfig: Schema.Codec<MulticropConfig, Partial<MulticropConfig>> = MulticropFields.check(
  consistent,
);

/** The reference defaults, decoded from an empty config. */
export const defaultMulticropConfig: MulticropConfig = Schema.decodeUnknownSync(MulticropConfig)({});

/**
 * A profile for 32 px data (CIFAR-like), as raw config to merge with user
 * settings: 2 crops of 32 px, area (0.14, 1) as the reference's large crops,
 * and 4 crops of 16 px with area (0.08, 0.4). At 32 px a 16 px crop keeps its
 * content near native resolution for areas around 0.25 (as the reference's
 * 96 px crops of ~500x375 images do at 0.05); the range around it avoids
 * 3-pixel crops blown up to 16. Blur is off: with sigma up to 2 at 32 px it
 * wipes out most of the image (solo-learn and SimCLR's CIFAR recipes drop it).
 */
export const smallImageProfile = {
  nmbCrops: [2, 4],
  sizeCrops: [32, 16],
  minScaleCrops: [0.14, 0.08],
  maxScaleCrops: [1, 0.4],
  blur: false,
} as const;

/** Every random choice for one crop, sampled before any pixel work (so it can be logged or replayed). */
export interface CropParams {
  readonly box: CropBox;
  readonly flip: boolean;
  /** Colour jitter parameters, or undefined when the jitter is not applied. */
  readonly jitter: ColorJitterParams | undefined;
  readonly grayscale: boolean;
  /** Blur sigma, or undefined when not blurred. */
  readonly blurSigma: number | undefined;
}

/** Draws one crop's parameters for group `group`, in the reference's order of transforms. */
export const sampleCropParams = (
  height: number,
  width: number,
  group: number,
  config: MulticropConfig,
  rng: Rng,
): CropParams => {
  const box = randomResizedCropParams(
    height,
    width,
    [config.minScaleCrops[group], config.maxScaleCrops[group]],
    config.aspectRatio,
    rng,
  );
  const flip = rng.bernoulli(config.flipProbability);
  const jitter = rng.bernoulli(config.jitterProbability) ? sampleColorJitter(config, rng) : undefined;
  const grayscale = rng.bernoulli(config.grayscaleProbability);
  const blurSigma = config.blur && rng.bernoulli(config.blurProbability)
    ? rng.uniform(config.blurSigma[0], config.blurSigma[1])
    : undefined;
  return { box, flip, jitter, grayscale, blurSigma };
};

let work = new Float32Array(0);

/**
 * Applies one crop's parameters to `image`: a `size` x `size` crop, HWC
 * float32, `channels` channels, normalised. `out` may be passed to reuse memory.
 */
export const applyCropParams = (
  image: RgbImage,
  params: CropParams,
  size: number,
  options: { readonly channels: 1 | 3; readonly mean: readonly number[]; readonly std: readonly number[] },
  out: Float32Array = new Float32Array(size * size * options.channels),
): Float32Array => {
  const length = size * size * 3;
  if (work.length < length) work = new Float32Array(length);
  const rgb = work;
  cropResize(image.data, image.width, params.box, size, size, params.flip, rgb);
  if (params.jitter !== undefined) colorJitter(rgb, params.jitter, length);
  if (params.grayscale) rgbToGrayscale(rgb, length);
  if (params.blurSigma !== undefined) gaussianBlur(rgb, size, size, params.blurSigma);
  return normalizeInto(rgb, out, options.mean, options.std, options.channels);
};

const checkImage = (image: RgbImage): void => {
  // Runs per sample in a data worker, which turns a failure into a LoaderError naming the file; the
  // decoder never returns an empty image, so this guards hand-made ones.
  kernelInvariant(
    image.width >= 1 && image.height >= 1 && image.data.length === image.width * image.height * 3,
    () =>
      `multicrop: image must be HWC RGB with data length width*height*3, got ${image.width}x${image.height} and ${image.data.length} bytes`,
  );
};

/**
 * All crops of one sample: nmbCrops[g] crops of sizeCrops[g] px for each
 * group g in turn, each HWC float32 normalised with `config.channels` channels.
 * Deterministic in `rng`.
 *
 * @example Two 32 px and four 16 px crops of a 48 x 40 image
 * ```ts
 * import { Schema } from "effect";
 * import assert from "node:assert/strict";
 * import { MulticropConfig, multicropSample, rngFor, smallImageProfile } from "@swav/swav-ts";
 *
 * const config = Schema.decodeUnknownSync(MulticropConfig)(smallImageProfile); // 2 x 32 px + 4 x 16 px
 * const image = { width: 48, height: 40, data: new Uint8Array(48 * 40 * 3).fill(128) };
 * const crops = multicropSample(image, config, rngFor(2020, 0, 7)); // seed, epoch, sample index
 * assert.deepEqual(crops.map((c) => c.length), [...Array(2).fill(32 * 32 * 3), ...Array(4).fill(16 * 16 * 3)]);
 * // The same key draws the same crops: runs are reproducible sample by sample.
 * assert.deepEqual(multicropSample(image, config, rngFor(2020, 0, 7)), crops);
 * ```
 */
export const multicropSample = (image: RgbImage, config: MulticropConfig, rng: Rng): Float32Array[] => {
  checkImage(image);
  const crops: Float32Array[] = [];
  for (let g = 0; g < config.nmbCrops.length; g++) {
    const size = config.sizeCrops[g];
    for (let v = 0; v < config.nmbCrops[g]; v++) {
      const params = sampleCropParams(image.height, image.width, g, config, rng);
      crops.push(applyCropParams(image, params, size, config));
    }
  }
  return crops;
};

/**
 * Stacks the crops of B samples into one tensor per size group, shape
 * [nmbCrops[g] * B, size, size, channels], crop-major: rows [v*B, (v+1)*B)
 * are crop v of the group for samples 0..B-1. The caller owns the tensors.
 */
export const collateCrops = (
  samples: readonly (readonly Float32Array[])[],
  config: Pick<MulticropConfig, "nmbCrops" | "sizeCrops" | "channels">,
): tf.Tensor4D[] => {
  const batch = samples.length;
  const total = config.nmbCrops.reduce((a, b) => a + b, 0);
  samples.forEach((crops, b) => {
    // Synchronous collation inside the step's scope: the loader's crops come from the same config.
    kernelInvariant(
      crops.length === total,
      () => `collateCrops: sample ${b} has ${crops.length} crops, config has ${total}`,
    );
  });
  const tensors: tf.Tensor4D[] = [];
  let offset = 0;
  for (let g = 0; g < config.nmbCrops.length; g++) {
    const size = config.sizeCrops[g];
    const count = config.nmbCrops[g];
    const cropLength = size * size * config.channels;
    const data = new Float32Array(count * batch * cropLength);
    for (let v = 0; v < count; v++) {
      for (let b = 0; b < batch; b++) {
        const crop = samples[b][offset + v];
        kernelInvariant(
          crop.length === cropLength,
          () =>
            `collateCrops: sample ${b} crop ${
              offset + v
            } has ${crop.length} values, expected ${cropLength} (${size}x${size}x${config.channels})`,
        );
        data.set(crop, (v * batch + b) * cropLength);
      }
    }
    tensors.push(tf.tensor4d(data, [count * batch, size, size, config.channels]));
    offset += count;
  }
  return tensors;
};

/** Options of the evaluation transform. */
export interface EvalTransformOptions {
  readonly size: number;
  readonly channels: 1 | 3;
  readonly mean: readonly number[];
  readonly std: readonly number[];
  /** Shorter side after resizing, before the centre crop; defaults to `size` (e.g. 256 for size 224 as in ImageNet eval). */
  readonly resize?: number;
}

/**
 * torchvision's eval transform: Resize(shorter side = resize) with
 * antialiased bilinear, CenterCrop(size), ToTensor, Normalize. An image that
 * already is size x size (and resize = size) passes through unchanged apart
 * from the normalisation. Returns HWC float32 with `channels` channels.
 */
export const evalTransform = (image: RgbImage, options: EvalTransformOptions): Float32Array => {
  checkImage(image);
  const { size, channels } = options;
  const resize = options.resize ?? size;
  const short = Math.min(image.width, image.height);
  const long = Math.max(image.width, image.height);
  // torchvision's _compute_resized_output_size: the longer side is truncated.
  const newLong = Math.trunc((resize * long) / short);
  const newWidth = image.width <= image.height ? resize : newLong;
  const newHeight = image.width <= image.height ? newLong : resize;
  // Per sample in a data worker (a failure becomes a LoaderError naming the file).
  kernelInvariant(
    size <= newWidth && size <= newHeight,
    () => `evalTransform: crop ${size} exceeds the resized image ${newWidth}x${newHeight}`,
  );
  const resized = new Float32Array(newWidth * newHeight * 3);
  cropResize(
    image.data,
    image.width,
    { top: 0, left: 0, height: image.height, width: image.width },
    newHeight,
    newWidth,
    false,
    resized,
  );
  // torchvision's center_crop: int(round((H - size) / 2.0)).
  const top = pythonRound((newHeight - size) / 2);
  const left = pythonRound((newWidth - size) / 2);
  const rgb = new Float32Array(size * size * 3);
  for (let y = 0; y < size; y++) {
    const from = ((top + y) * newWidth + left) * 3;
    rgb.set(resized.subarray(from, from + size * 3), y * size * 3);
  }
  return normalizeInto(rgb, new Float32Array(size * size * channels), options.mean, options.std, channels);
};

/** One sample for the multicrop stage: the image and the key of its randomness. */
export interface MulticropInput {
  /** The decoded image. */
  readonly image: RgbImage;
  /** The run's seed. */
  readonly seed: number;
  /** The epoch, so every epoch draws new crops. */
  readonly epoch: number;
  /** Index of the sample in the data set (not its position in the shuffled order). */
  readonly index: number;
}

/**
 * multicrop stage: an image and its (seed, epoch, index) key to its crops,
 * grouped by resolution (see `multicropSample`); `collateCrops` batches them.
 *
 * @example As a stage: configured from JSON, keyed by (seed, epoch, index)
 * ```ts
 * import { Effect } from "effect";
 * import assert from "node:assert/strict";
 * import { configure, multicropStage } from "@swav/swav-ts";
 *
 * const crops = await Effect.runPromise(Effect.gen(function* () {
 *   const multicrop = yield* configure(multicropStage, { nmbCrops: [2, 2], sizeCrops: [24, 12] });
 *   const image = { width: 32, height: 32, data: new Uint8Array(32 * 32 * 3).fill(200) };
 *   return yield* multicrop({ image, seed: 1, epoch: 0, index: 0 });
 * }));
 * assert.equal(crops.length, 4);
 * ```
 */
export const multicropStage: Stage<MulticropInput, Float32Array[], MulticropConfig> = defineStage<
  MulticropInput,
  Float32Array[],
  MulticropConfig
>({
  name: "multicrop",
  config: MulticropConfig,
  run: (config) => (input) =>
    Effect.sync(() => multicropSample(input.image, config, rngFor(input.seed, input.epoch, input.index))),
});

/** SwAV multi-crop (`multicropSample`), for the loader (`data/loader.ts`), one buffer per crop. */
export const multicropPrepare = <C>(config: C): PrepareRef<C> => ({
  module: import.meta.url,
  name: "multicropSample",
  config,
});

/** Deterministic evaluation transform (`evalTransform`), for the loader: resize, centre crop, normalise. */
export const evalPrepare = <C>(options: C): PrepareRef<C> => ({
  module: import.meta.url,
  name: "evalTransform",
  config: options,
});
