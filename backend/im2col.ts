/**
 * Convolution geometry in NHWC and the column matrix of the native
 * convolutions (backend/native_kernels.ts): im2col, and its adjoint col2im.
 */
import type * as tf from "@tensorflow/tfjs";
import type { DnnlConvShape } from "./onednn.ts";

/** Convolution geometry in NHWC (the oneDNN shape without its far paddings). */
export type ConvGeometry = Omit<DnnlConvShape, "bottom" | "right">;

export const geometry = (c: tf.backend_util.Conv2DInfo): ConvGeometry => ({
  n: c.batchSize,
  h: c.inHeight,
  w: c.inWidth,
  ci: c.inChannels,
  oh: c.outHeight,
  ow: c.outWidth,
  co: c.outChannels,
  kh: c.filterHeight,
  kw: c.filterWidth,
  sh: c.strideHeight,
  sw: c.strideWidth,
  dh: c.dilationHeight,
  dw: c.dilationWidth,
  top: c.padInfo.top,
  left: c.padInfo.left,
});

/** x itself is the column matrix: 1x1 filter, stride 1, no padding. */
export const isPointwise = (g: ConvGeometry) =>
  g.kh === 1 && g.kw === 1 && g.sh === 1 && g.sw === 1 && g.top === 0 && g.left === 0 &&
  g.oh === g.h && g.ow === g.w;

/**
 * Column rows of images [n0, n1): row ((n − n0)·OH + oh)·OW + ow, column (kh·KW + kw)·Ci + ci.
 * Where a filter row lies wholly inside the image (dilation 1), its KW·Ci values
 * are one contiguous stretch of x, copied in one loop (the common case).
 */
export const im2col = (x: Float32Array, g: ConvGeometry, n0: number, n1: number, col: Float32Array): void => {
  const { h, w, ci, oh, ow, kh, kw, sh, sw, dh, dw, top, left } = g;
  const k = kh * kw * ci;
  const span = kw * ci;
  const dense = dw === 1;
  let dst = 0;
  for (let n = n0; n < n1; n++) {
    const base = n * h * w * ci;
    for (let y = 0; y < oh; y++) {
      for (let xo = 0; xo < ow; xo++) {
        const iw0 = xo * sw - left;
        const inside = dense && iw0 >= 0 && iw0 + kw <= w;
        for (let i = 0; i < kh; i++) {
          const ih = y * sh - top + i * dh;
          let d = dst + i * span;
          if (ih < 0 || ih >= h) {
            col.fill(0, d, d + span);
            continue;
          }
          const rowBase = base + ih * w * ci;
          if (inside) {
            const s = rowBase + iw0 * ci;
            for (let c = 0; c < span; c++) col[d + c] = x[s + c]!;
            continue;
          }
          for (let j = 0; j < kw; j++, d += ci) {
            const iw = iw0 + j * dw;
            if (iw < 0 || iw >= w) {
              for (let c = 0; c < ci; c++) col[d + c] = 0;
              continue;
            }
            const s = rowBase + iw * ci;
            for (let c = 0; c < ci; c++) col[d + c] = x[s + c]!;
          }
        }
        dst += k;
      }
    }
  }
};

/** The adjoint of im2col: adds the column rows of images [n0, n1) into dx (which the caller zeroed). */
export const col2imAdd = (
  col: Float32Array,
  g: ConvGeometry,
  n0: number,
  n1: number,
  dx: Float32Array,
): void => {
  const { h, w, ci, oh, ow, kh, kw, sh, sw, dh, dw, top, left } = g;
  const k = kh * kw * ci;
  const span = kw * ci;
  const dense = dw === 1;
  let src = 0;
  for (let n = n0; n < n1; n++) {
    const base = n * h * w * ci;
    for (let y = 0; y < oh; y++) {
      for (let xo = 0; xo < ow; xo++) {
        const iw0 = xo * sw - left;
        const inside = dense && iw0 >= 0 && iw0 + kw <= w;
        for (let i = 0; i < kh; i++) {
          const ih = y * sh - top + i * dh;
          if (ih < 0 || ih >= h) continue;
          const rowBase = base + ih * w * ci;
          let s = src + i * span;
          if (inside) {
            const d = rowBase + iw0 * ci;
            for (let c = 0; c < span; c++) dx[d + c] += col[s + c]!;
            continue;
          }
          for (let j = 0; j < kw; j++, s += ci) {
            const iw = iw0 + j * dw;
            if (iw < 0 || iw >= w) continue;
            const d = rowBase + iw * ci;
            for (let c = 0; c < ci; c++) dx[d + c] += col[s + c]!;
          }
        }
        src += k;
      }
    }
  }
};
