/**
 * The transforms of SwAV's evaluation scripts (`eval_linear.py`, `eval_semisup.py`) around the
 * deterministic eval transform (`evalTransform` in `stages/multicrop.ts`):
 *
 *   train: RandomResizedCrop(size) (scale 0.08..1, ratio 3/4..4/3) -> RandomHorizontalFlip -> ToTensor -> Normalize
 *   test:  Resize(evalResizeFor(size)) -> CenterCrop(size) -> ToTensor -> Normalize
 *
 * The reference runs them on PIL images (uint8, antialiased bilinear); here the resample is
 * torchvision's antialiased bilinear on floats (`cropResize`), which is PIL's filter without its
 * uint8 rounding between the two passes.
 */
import { type CropBox, cropResize, normalizeInto, randomResizedCropParams } from "./augment.ts";
import type { RgbImage } from "./image_codec.ts";
import type { Rng } from "./rng.ts";

/** The reference's test-time ratio: Resize(256) before CenterCrop(224). */
export const EVAL_RESIZE_RATIO = 256 / 224;

/**
 * The shorter side to resize to before a centre crop of `size`: 256 for 224, and the same
 * proportion for other sizes, truncated as Python's `int()` truncates (`int(size * 256 / 224)`,
 * the rule timm's `crop_pct` 0.875 gives). `size * 256` is an integer, so the division is exact
 * enough that no product lands on the wrong side of an integer.
 */
export const evalResizeFor = (size: number, ratio: number = EVAL_RESIZE_RATIO): number =>
  ratio === EVAL_RESIZE_RATIO ? Math.floor((size * 256) / 224) : Math.floor(size * ratio + 1e-9);

/** Options of the linear-evaluation training transform. */
export interface TrainCropOptions {
  readonly size: number;
  readonly channels: 1 | 3;
  readonly mean: readonly number[];
  readonly std: readonly number[];
  /** RandomResizedCrop's area fraction range (torchvision's default 0.08..1). */
  readonly scale?: readonly [number, number];
  /** RandomResizedCrop's aspect ratio range (3/4..4/3). */
  readonly ratio?: readonly [number, number];
  /** RandomHorizontalFlip's probability (0.5). */
  readonly flipProbability?: number;
}

/** torchvision's RandomResizedCrop defaults. */
export const TRAIN_CROP_SCALE: readonly [number, number] = [0.08, 1];
export const TRAIN_CROP_RATIO: readonly [number, number] = [3 / 4, 4 / 3];

/** The crop box and flip a sample gets: RandomResizedCrop.get_params, then the flip's coin. */
export const drawTrainCrop = (
  image: RgbImage,
  options: TrainCropOptions,
  rng: Rng,
): { readonly box: CropBox; readonly flip: boolean } => {
  const box = randomResizedCropParams(
    image.height,
    image.width,
    options.scale ?? TRAIN_CROP_SCALE,
    options.ratio ?? TRAIN_CROP_RATIO,
    rng,
  );
  return { box, flip: rng.next() < (options.flipProbability ?? 0.5) };
};

/** `resized_crop(box, size)` (antialiased bilinear), flipped when asked, then Normalize: HWC float32. */
export const trainCropAt = (
  image: RgbImage,
  box: CropBox,
  flip: boolean,
  options: TrainCropOptions,
): Float32Array => {
  const rgb = cropResize(
    image.data,
    image.width,
    box,
    options.size,
    options.size,
    flip,
    new Float32Array(
      options.size * options.size * 3,
    ),
  );
  return normalizeInto(
    rgb,
    new Float32Array(options.size * options.size * options.channels),
    options.mean,
    options.std,
    options.channels,
  );
};

/**
 * The linear evaluation's (and fine-tuning's) training transform, with the loader's prepare
 * signature: a fresh RandomResizedCrop + flip per (seed, epoch, index).
 */
export const trainCrop = (image: RgbImage, options: TrainCropOptions, rng: Rng): Float32Array => {
  const { box, flip } = drawTrainCrop(image, options, rng);
  return trainCropAt(image, box, flip, options);
};
