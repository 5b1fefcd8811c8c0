/**
 * Image operations for SwAV's multi-crop augmentation, on HWC row-major buffers.
 *
 * The SwAV reference applies crop, flip, colour jitter, grayscale and blur to
 * PIL uint8 images and only then converts to float (`ToTensor`). This module
 * defines the same pipeline on float32 values in [0, 1] after the crop, with
 * the semantics of torchvision's tensor functional API (`torchvision.transforms
 * .functional` on tensors): same formulas, no uint8 rounding between steps.
 * The blur is a true Gaussian (torchvision's `gaussian_blur`); the reference's
 * PIL `GaussianBlur` approximates one with box passes.
 *
 * Everything here is plain synchronous JavaScript meant for worker threads:
 * colour ops work in place, and the crop, resize and blur passes reuse module
 * scratch buffers (a worker runs one sample at a time), so the inner loops
 * allocate nothing.
 */
import type { RgbImage } from "./image_codec.ts";
import type { Rng } from "./rng.ts";

/** An 8-bit RGB image, HWC row-major (the output of the decode stage). */
export type { RgbImage };

/** A crop box in pixels: rows [top, top + height), columns [left, left + width). */
export interface CropBox {
  readonly top: number;
  readonly left: number;
  readonly height: number;
  readonly width: number;
}

/** Python's `round` (half to even), which torchvision's crop arithmetic uses. */
export const pythonRound = (x: number): number => {
  const floor = Math.floor(x);
  const diff = x - floor;
  if (diff > 0.5) return floor + 1;
  if (diff < 0.5) return floor;
  return floor % 2 === 0 ? floor : floor + 1;
};

/**
 * `torchvision.transforms.RandomResizedCrop.get_params`: up to 10 attempts
 * drawing an area fraction uniform in `scale` and a log-uniform aspect ratio
 * (width / height) in `ratio`; the first box that fits is placed uniformly.
 * When none fits, the centre crop of the whole image, its aspect ratio
 * clamped into `ratio`.
 */
export const randomResizedCropParams = (
  height: number,
  width: number,
  scale: readonly [number, number],
  ratio: readonly [number, number],
  rng: Rng,
): CropBox => {
  const area = height * width;
  const logLow = Math.log(ratio[0]);
  const logHigh = Math.log(ratio[1]);
  for (let attempt = 0; attempt < 10; attempt++) {
    const targetArea = area * rng.uniform(scale[0], scale[1]);
    const aspectRatio = Math.exp(rng.uniform(logLow, logHigh));
    const w = pythonRound(Math.sqrt(targetArea * aspectRatio));
    const h = pythonRound(Math.sqrt(targetArea / aspectRatio));
    if (0 < w && w <= width && 0 < h && h <= height) {
      const top = rng.int(0, height - h);
      const left = rng.int(0, width - w);
      return { top, left, height: h, width: w };
    }
  }
  const inRatio = width / height;
  let w: number;
  let h: number;
  if (inRatio < Math.min(ratio[0], ratio[1])) {
    w = width;
    h = pythonRound(w / Math.min(ratio[0], ratio[1]));
  } else if (inRatio > Math.max(ratio[0], ratio[1])) {
    h = height;
    w = pythonRound(h * Math.max(ratio[0], ratio[1]));
  } else {
    w = width;
    h = height;
  }
  return { top: Math.floor((height - h) / 2), left: Math.floor((width - w) / 2), height: h, width: w };
};

/** Per-output-index taps of a 1-D antialiased bilinear resample. */
interface ResampleTaps {
  /** First input index of each output index. */
  readonly start: Int32Array;
  /** Number of taps used by each output index. */
  readonly count: Int32Array;
  /** Weights, `stride` per output index. */
  readonly weights: Float64Array;
  readonly stride: number;
}

/**
 * Taps of torch's `_upsample_bilinear2d_aa` (align_corners false) along one
 * axis, which is PIL's BILINEAR filter: a triangle whose support is scaled by
 * the downscale factor when shrinking (so it antialiases), and plain bilinear
 * (support 1) when enlarging. Weights are normalised per output index, so
 * taps cut by the border renormalise rather than clamp. `gain` scales all
 * weights (1/255 folds the uint8 -> [0, 1] conversion into the resample).
 */
const resampleTaps = (inSize: number, outSize: number, gain: number): ResampleTaps => {
  const scale = inSize / outSize;
  const support = scale >= 1 ? scale : 1;
  const invScale = scale >= 1 ? 1 / scale : 1;
  const stride = Math.ceil(support) * 2 + 1;
  const start = new Int32Array(outSize);
  const count = new Int32Array(outSize);
  const weights = new Float64Array(outSize * stride);
  for (let i = 0; i < outSize; i++) {
    const center = scale * (i + 0.5);
    // C++ casts truncate toward zero: Math.trunc, then clamp like std::max/std::min.
    const xmin = Math.max(Math.trunc(center - support + 0.5), 0);
    const xsize = Math.min(Math.trunc(center + support + 0.5), inSize) - xmin;
    let total = 0;
    for (let j = 0; j < xsize; j++) {
      const x = Math.abs((j + xmin - center + 0.5) * invScale);
      const w = x < 1 ? 1 - x : 0;
      weights[i * stride + j] = w;
      total += w;
    }
    const norm = total !== 0 ? gain / total : gain;
    for (let j = 0; j < xsize; j++) weights[i * stride + j] *= norm;
    start[i] = xmin;
    count[i] = xsize;
  }
  return { start, count, weights, stride };
};

let resizeScratch = new Float32Array(0);
const ensure = (buffer: Float32Array<ArrayBuffer>, length: number): Float32Array<ArrayBuffer> =>
  buffer.length >= length ? buffer : new Float32Array(Math.max(length, buffer.length * 2));

/**
 * Crops `box` out of an RGB source and resizes it to `outHeight` x `outWidth`
 * with antialiased bilinear filtering, as torchvision's
 * `resized_crop(img, top, left, h, w, size, antialias=True)`, mirrored left to
 * right when `flip`. Fused: the horizontal pass reads the source box directly
 * and writes flipped columns; the vertical pass writes `out`. A uint8 source
 * is scaled to [0, 1] (`ToTensor`); a float source is taken as is.
 * Returns `out` (length outHeight * outWidth * 3).
 */
export const cropResize = (
  source: Uint8Array | Float32Array,
  sourceWidth: number,
  box: CropBox,
  outHeight: number,
  outWidth: number,
  flip: boolean,
  out: Float32Array,
): Float32Array => {
  const gain = source instanceof Uint8Array ? 1 / 255 : 1;
  const horizontal = resampleTaps(box.width, outWidth, gain);
  const vertical = resampleTaps(box.height, outHeight, 1);
  const rowLength = outWidth * 3;
  resizeScratch = ensure(resizeScratch, box.height * rowLength);
  const tmp = resizeScratch;
  // Horizontal pass over the rows of the box: tmp is box.height x outWidth x 3.
  const hStart = horizontal.start;
  const hCount = horizontal.count;
  const hWeights = horizontal.weights;
  const hStride = horizontal.stride;
  for (let y = 0; y < box.height; y++) {
    const rowBase = ((box.top + y) * sourceWidth + box.left) * 3;
    const tmpRow = y * rowLength;
    for (let x = 0; x < outWidth; x++) {
      let r = 0;
      let g = 0;
      let b = 0;
      let s = rowBase + hStart[x] * 3;
      const wBase = x * hStride;
      const n = hCount[x];
      for (let t = 0; t < n; t++, s += 3) {
        const w = hWeights[wBase + t];
        r += w * source[s];
        g += w * source[s + 1];
        b += w * source[s + 2];
      }
      const d = tmpRow + (flip ? outWidth - 1 - x : x) * 3;
      tmp[d] = r;
      tmp[d + 1] = g;
      tmp[d + 2] = b;
    }
  }
  // Vertical pass: each output row is a weighted sum of whole tmp rows.
  const vStride = vertical.stride;
  for (let y = 0; y < outHeight; y++) {
    const outRow = y * rowLength;
    const first = vertical.start[y];
    const n = vertical.count[y];
    const wBase = y * vStride;
    const w0 = vertical.weights[wBase];
    let src = first * rowLength;
    for (let k = 0; k < rowLength; k++) out[outRow + k] = w0 * tmp[src + k];
    for (let t = 1; t < n; t++) {
      const w = vertical.weights[wBase + t];
      src = (first + t) * rowLength;
      for (let k = 0; k < rowLength; k++) out[outRow + k] += w * tmp[src + k];
    }
  }
  return out;
};

/** Mirrors an HWC image left to right in place (`hflip`). */
export const hflip = (
  buffer: Float32Array,
  height: number,
  width: number,
  channels: number,
): Float32Array => {
  for (let y = 0; y < height; y++) {
    let a = y * width * channels;
    let b = a + (width - 1) * channels;
    for (; a < b; a += channels, b -= channels) {
      for (let c = 0; c < channels; c++) {
        const tmp = buffer[a + c];
        buffer[a + c] = buffer[b + c];
        buffer[b + c] = tmp;
      }
    }
  }
  return buffer;
};

const clamp01 = (x: number): number => (x < 0 ? 0 : x > 1 ? 1 : x);

// torchvision's tensor rgb_to_grayscale weights (ITU-R 601-2 rounded as PIL's L mode docs).
const GREY_R = 0.2989;
const GREY_G = 0.587;
const GREY_B = 0.114;

/** `adjust_brightness`: clamp(f * x) on an RGB float buffer, in place. */
export const adjustBrightness = (rgb: Float32Array, factor: number, length = rgb.length): Float32Array => {
  for (let i = 0; i < length; i++) rgb[i] = clamp01(factor * rgb[i]);
  return rgb;
};

/** `adjust_contrast`: blend with the mean of the grayscale image, clamp, in place. */
export const adjustContrast = (rgb: Float32Array, factor: number, length = rgb.length): Float32Array => {
  let sum = 0;
  for (let i = 0; i < length; i += 3) sum += GREY_R * rgb[i] + GREY_G * rgb[i + 1] + GREY_B * rgb[i + 2];
  const offset = (1 - factor) * (sum / (length / 3));
  for (let i = 0; i < length; i++) rgb[i] = clamp01(factor * rgb[i] + offset);
  return rgb;
};

/** `adjust_saturation`: blend each pixel with its grey value, clamp, in place. */
export const adjustSaturation = (rgb: Float32Array, factor: number, length = rgb.length): Float32Array => {
  const keep = 1 - factor;
  for (let i = 0; i < length; i += 3) {
    const r = rgb[i];
    const g = rgb[i + 1];
    const b = rgb[i + 2];
    const grey = keep * (GREY_R * r + GREY_G * g + GREY_B * b);
    rgb[i] = clamp01(factor * r + grey);
    rgb[i + 1] = clamp01(factor * g + grey);
    rgb[i + 2] = clamp01(factor * b + grey);
  }
  return rgb;
};

/**
 * `adjust_hue`: rotate the hue by `factor` turns (in [-0.5, 0.5]) through
 * torchvision's `_rgb2hsv` / `_hsv2rgb`, in place, one pixel at a time (no
 * HSV buffer); results equal torchvision's up to float rounding (tested).
 */
export const adjustHue = (rgb: Float32Array, factor: number, length = rgb.length): Float32Array => {
  for (let i = 0; i < length; i += 3) {
    const r = rgb[i];
    const g = rgb[i + 1];
    const b = rgb[i + 2];
    const maxc = Math.max(r, g, b);
    const minc = Math.min(r, g, b);
    if (maxc === minc) continue; // grey: saturation 0, hue rotation changes nothing
    const cr = maxc - minc;
    const s = cr / maxc;
    const inv = 1 / cr;
    const rc = (maxc - r) * inv;
    const gc = (maxc - g) * inv;
    const bc = (maxc - b) * inv;
    // torchvision's branch priority on ties: red, then green, then blue.
    let h = maxc === r ? bc - gc : maxc === g ? 2 + rc - bc : 4 + gc - rc;
    // torch.fmod(h / 6 + 1, 1): the argument lies in [5/6, 7/6], where x - floor(x) is exact
    // (and much cheaper than JavaScript's float %, a call to fmod).
    h = h / 6 + 1;
    h -= Math.floor(h);
    h += factor;
    h -= Math.floor(h); // Python's % 1.0
    // _hsv2rgb without its six-way select: channel n in (5, 3, 1) for (r, g, b) is
    // v - v*s*clamp(min(k, 4 - k), 0, 1) with k = (n + 6h) mod 6, which equals the sector
    // table's v, t, p, q entries (p = v(1 - s), q = v(1 - s f), t = v(1 - s(1 - f))).
    const h6 = h * 6;
    const vs = maxc * s;
    let k = 5 + h6;
    if (k >= 6) k -= 6;
    rgb[i] = maxc - vs * Math.max(0, Math.min(k, 4 - k, 1));
    k = 3 + h6;
    if (k >= 6) k -= 6;
    rgb[i + 1] = maxc - vs * Math.max(0, Math.min(k, 4 - k, 1));
    k = 1 + h6;
    if (k >= 6) k -= 6;
    rgb[i + 2] = maxc - vs * Math.max(0, Math.min(k, 4 - k, 1));
  }
  return rgb;
};

/** `rgb_to_grayscale(img, num_output_channels=3)`: grey value in all three channels, in place. */
export const rgbToGrayscale = (rgb: Float32Array, length = rgb.length): Float32Array => {
  for (let i = 0; i < length; i += 3) {
    const grey = GREY_R * rgb[i] + GREY_G * rgb[i + 1] + GREY_B * rgb[i + 2];
    rgb[i] = grey;
    rgb[i + 1] = grey;
    rgb[i + 2] = grey;
  }
  return rgb;
};

/** Sampled parameters of one `ColorJitter` application. */
export interface ColorJitterParams {
  /** Order of the ops: 0 brightness, 1 contrast, 2 saturation, 3 hue (a permutation of 0..3). */
  readonly order: ArrayLike<number>;
  /** Factors; `undefined` where the op is disabled (jitter strength 0). */
  readonly brightness: number | undefined;
  readonly contrast: number | undefined;
  readonly saturation: number | undefined;
  readonly hue: number | undefined;
}

/** Jitter strengths as `ColorJitter(brightness, contrast, saturation, hue)` takes them. */
export interface ColorJitterStrength {
  readonly brightness: number;
  readonly contrast: number;
  readonly saturation: number;
  readonly hue: number;
}

/**
 * `ColorJitter.get_params`: a random order of the four ops, brightness,
 * contrast and saturation factors uniform in [max(0, 1 - s), 1 + s], hue
 * uniform in [-h, h]. An op with strength 0 is disabled, as torchvision does.
 */
export const sampleColorJitter = (strength: ColorJitterStrength, rng: Rng): ColorJitterParams => {
  const order = rng.permutation(4);
  const factor = (s: number): number | undefined =>
    s === 0 ? undefined : rng.uniform(Math.max(0, 1 - s), 1 + s);
  const brightness = factor(strength.brightness);
  const contrast = factor(strength.contrast);
  const saturation = factor(strength.saturation);
  const hue = strength.hue === 0 ? undefined : rng.uniform(-strength.hue, strength.hue);
  return { order, brightness, contrast, saturation, hue };
};

/** Applies sampled `ColorJitter` parameters in their order, in place. */
export const colorJitter = (
  rgb: Float32Array,
  params: ColorJitterParams,
  length = rgb.length,
): Float32Array => {
  for (let k = 0; k < params.order.length; k++) {
    switch (params.order[k]) {
      case 0:
        if (params.brightness !== undefined) adjustBrightness(rgb, params.brightness, length);
        break;
      case 1:
        if (params.contrast !== undefined) adjustContrast(rgb, params.contrast, length);
        break;
      case 2:
        if (params.saturation !== undefined) adjustSaturation(rgb, params.saturation, length);
        break;
      case 3:
        if (params.hue !== undefined) adjustHue(rgb, params.hue, length);
        break;
    }
  }
  return rgb;
};

/** The blur kernel size for `sigma`: odd, covering +-3 sigma (99.7 % of the mass). */
export const gaussianKernelSize = (sigma: number): number => 2 * Math.ceil(3 * sigma) + 1;

/** torchvision's `_get_gaussian_kernel1d`: exp(-x^2 / (2 sigma^2)) on the centred grid, normalised. */
export const gaussianKernel1d = (kernelSize: number, sigma: number): Float64Array => {
  const kernel = new Float64Array(kernelSize);
  const half = (kernelSize - 1) / 2;
  let sum = 0;
  for (let i = 0; i < kernelSize; i++) {
    const x = (i - half) / sigma;
    kernel[i] = Math.exp(-0.5 * x * x);
    sum += kernel[i];
  }
  for (let i = 0; i < kernelSize; i++) kernel[i] /= sum;
  return kernel;
};

/** Reflect padding index (no edge repeat, as torch's "reflect"), folded again for tiny images. */
const reflect = (i: number, n: number): number => {
  if (n === 1) return 0;
  const period = 2 * (n - 1);
  let m = i % period;
  if (m < 0) m += period;
  return m < n ? m : period - m;
};

let blurRow = new Float32Array(0);
let blurTmp = new Float32Array(0);

/**
 * torchvision's `gaussian_blur(img, [k, k], [sigma, sigma])` on an HWC RGB
 * float buffer, in place: a separable true Gaussian with reflect padding of
 * k // 2 on each side. Horizontal pass into scratch through a padded copy of
 * each row, vertical pass back into `rgb`; the symmetric kernel is folded so
 * each tap pair costs one multiply.
 */
export const gaussianBlur = (
  rgb: Float32Array,
  height: number,
  width: number,
  sigma: number,
  kernelSize = gaussianKernelSize(sigma),
): Float32Array => {
  const kernel = gaussianKernel1d(kernelSize, sigma);
  const radius = kernelSize >> 1;
  const centre = kernel[radius];
  const rowLength = width * 3;
  blurRow = ensure(blurRow, (width + 2 * radius) * 3);
  blurTmp = ensure(blurTmp, height * rowLength);
  const padded = blurRow;
  const tmp = blurTmp;
  const pad = radius * 3;
  for (let y = 0; y < height; y++) {
    const row = y * rowLength;
    // Interior straight copy, reflected borders.
    for (let k = 0; k < rowLength; k++) padded[pad + k] = rgb[row + k];
    for (let x = 1; x <= radius; x++) {
      const left = row + reflect(-x, width) * 3;
      const right = row + reflect(width - 1 + x, width) * 3;
      const dl = (radius - x) * 3;
      const dr = (radius + width - 1 + x) * 3;
      padded[dl] = rgb[left];
      padded[dl + 1] = rgb[left + 1];
      padded[dl + 2] = rgb[left + 2];
      padded[dr] = rgb[right];
      padded[dr + 1] = rgb[right + 1];
      padded[dr + 2] = rgb[right + 2];
    }
    for (let k = 0; k < rowLength; k++) {
      const c = k + pad; // padded index of output k's centre tap
      let acc = centre * padded[c];
      for (let t = 1, off = 3; t <= radius; t++, off += 3) {
        acc += kernel[radius + t] * (padded[c - off] + padded[c + off]);
      }
      tmp[row + k] = acc;
    }
  }
  // Vertical pass: each output row accumulates whole rows of tmp (reflected at the borders).
  for (let y = 0; y < height; y++) {
    const out = y * rowLength;
    for (let k = 0; k < rowLength; k++) rgb[out + k] = centre * tmp[out + k];
    for (let t = 1; t <= radius; t++) {
      const w = kernel[radius + t];
      const up = reflect(y - t, height) * rowLength;
      const down = reflect(y + t, height) * rowLength;
      for (let k = 0; k < rowLength; k++) rgb[out + k] += w * (tmp[up + k] + tmp[down + k]);
    }
  }
  return rgb;
};

/**
 * `Normalize(mean, std)` of an RGB float buffer into `out`, which has 3 or 1
 * channels. With 1 channel, the RGB value is first turned into luma with
 * PIL's `convert("L")` weights (ITU-R 601-2: 299/1000, 587/1000, 114/1000),
 * then normalised with mean[0] and std[0].
 */
export const normalizeInto = (
  rgb: Float32Array,
  out: Float32Array,
  mean: readonly number[],
  std: readonly number[],
  channels: 1 | 3,
): Float32Array => {
  const pixels = out.length / channels;
  if (channels === 3) {
    const m0 = mean[0], m1 = mean[1], m2 = mean[2];
    const s0 = 1 / std[0], s1 = 1 / std[1], s2 = 1 / std[2];
    for (let i = 0; i < pixels * 3; i += 3) {
      out[i] = (rgb[i] - m0) * s0;
      out[i + 1] = (rgb[i + 1] - m1) * s1;
      out[i + 2] = (rgb[i + 2] - m2) * s2;
    }
  } else {
    const m = mean[0];
    const s = 1 / std[0];
    for (let p = 0, i = 0; p < pixels; p++, i += 3) {
      out[p] = ((rgb[i] * 299) / 1000 + (rgb[i + 1] * 587) / 1000 + (rgb[i + 2] * 114) / 1000 - m) * s;
    }
  }
  return out;
};
