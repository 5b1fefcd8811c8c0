/**
 * Small deterministic per-sample transforms with the loader's prepare signature
 * `(image, config, rng) => Float32Array`. The SwAV augmentations live in
 * `stages/multicrop.ts`; these are for tests, benchmarks and quick pipelines.
 */
import type { RgbImage } from "./image_codec.ts";
import type { Rng } from "./rng.ts";

export interface CropConfig {
  /** Side of the square crop; images smaller than this are padded with zeros. */
  readonly size: number;
  readonly channels: 1 | 3;
}

/** A size x size crop at a position drawn from `rng`, scaled to [0, 1], HWC. */
export const randomCrop = (image: RgbImage, config: CropConfig, rng: Rng): Float32Array =>
  cropAt(
    image,
    config,
    rng.int(0, Math.max(0, image.width - config.size)),
    rng.int(0, Math.max(0, image.height - config.size)),
  );

/** The centred size x size crop, scaled to [0, 1], HWC. */
export const centreCrop = (image: RgbImage, config: CropConfig): Float32Array =>
  cropAt(
    image,
    config,
    Math.max(0, (image.width - config.size) >> 1),
    Math.max(0, (image.height - config.size) >> 1),
  );

const cropAt = (image: RgbImage, { size, channels }: CropConfig, left: number, top: number): Float32Array => {
  const out = new Float32Array(size * size * channels);
  for (let y = 0; y < size && top + y < image.height; y++) {
    for (let x = 0; x < size && left + x < image.width; x++) {
      const i = ((top + y) * image.width + left + x) * 3;
      const o = (y * size + x) * channels;
      if (channels === 3) {
        out[o] = image.data[i] / 255;
        out[o + 1] = image.data[i + 1] / 255;
        out[o + 2] = image.data[i + 2] / 255;
      } else {
        // PIL's "L" conversion (ITU-R 601-2 luma), in floating point.
        out[o] = (image.data[i] * 0.299 + image.data[i + 1] * 0.587 + image.data[i + 2] * 0.114) / 255;
      }
    }
  }
  return out;
};
