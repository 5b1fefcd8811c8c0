/**
 * Which convolutions oneDNN takes and in which arithmetic: the shape of a convolution as the kernels
 * compute it, the shapes oneDNN must not be given, and where a convolution runs in bf16.
 */
import { activeKernelSettings } from "./kernel_settings.ts";

/** A convolution's shape in NHWC, as the kernels compute it. */
export interface DnnlConvShape {
  readonly n: number;
  readonly h: number;
  readonly w: number;
  readonly ci: number;
  readonly oh: number;
  readonly ow: number;
  readonly co: number;
  readonly kh: number;
  readonly kw: number;
  readonly sh: number;
  readonly sw: number;
  readonly dh: number;
  readonly dw: number;
  readonly top: number;
  readonly left: number;
  readonly bottom: number;
  readonly right: number;
}

export type DnnlDirection = "forward" | "backwardData" | "backwardWeights";

/**
 * Shapes oneDNN must not be given: the filter gradient of a strided 1x1
 * convolution on NHWC data whose input channels are not a multiple of the
 * channel block (8 with AVX2, 16 with AVX-512). Its jit 1x1 kernels first copy
 * x to unit stride into a per-thread scratchpad space booked as Ci values per
 * position but addressed in whole blocks (libdnnl2 2.6.3 here; upstream issue
 * oneDNN#6035): with one thread the copy runs past the scratchpad and corrupts
 * the C heap (glibc aborts), with more each thread overwrites the next one's
 * copy while it is read (filter gradients wrong by up to 50, differing run to
 * run). Those take the im2col + OpenBLAS path instead.
 */
export const overrunsScratchpad = (direction: DnnlDirection, g: DnnlConvShape): boolean =>
  direction === "backwardWeights" && g.kh === 1 && g.kw === 1 && (g.sh > 1 || g.sw > 1) && g.ci % 16 !== 0;

/**
 * Whether a filter gradient runs in bf16 under `precision: bf16`. oneDNN 2.6's AMX kernel for it
 * is 2-5x faster than fp32 only with few input channels on large outputs and up to 100x slower
 * elsewhere (2 threads, DNNL_VERBOSE, ms per call fp32 / bf16: 3x3 16->16 on 32x32 18 / 3.4,
 * 32->32 on 16x16 17 / 6.6, 1x1 16->32 on 16x16 11 / 2.5; but 3x3 64->64 on 16x16 33 / 155, on 8x8
 * 4 / 46, 1x1 64->128 on 4x4 3 / 148, 1x1 128->256 on 4x2 2 / 2561), so only the first kind run bf16.
 */
export const bf16FilterGradientPays = (g: DnnlConvShape): boolean => g.ci <= 32 && g.oh * g.ow >= 256;

/**
 * Switches for side-by-side measurements of the bf16 path in one process (bench/precision_bench.ts);
 * training leaves them at their defaults.
 */
export const bf16Tuning = {
  /** A layer's input-gradient and filter-gradient convolutions share one bf16 copy of dy. */
  shareDy: true,
};

/** Whether a call runs in bf16: asked for, and a filter gradient only where it pays. */
export const convPrecision = (direction: DnnlDirection, g: DnnlConvShape): "fp32" | "bf16" =>
  activeKernelSettings().precision === "bf16" &&
    (direction !== "backwardWeights" || bf16FilterGradientPays(g))
    ? "bf16"
    : "fp32";
