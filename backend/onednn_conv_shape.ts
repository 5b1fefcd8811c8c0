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
 * Whether a filter gradient runs in bf16 under `precision: bf16`. oneDNN 2.6's AMX kernel for it is
 * 2-5x faster than fp32 on large outputs and slower on small ones, where its blocking overhead
 * dominates (quiet machine, 2 threads, `bench/filter_gradient_bench.ts`, bf16 / fp32 time with the
 * fp32 side's copies of x and dy: 3x3/1 on 4x4 0.7-0.8, on 2x2 1.0-1.5; 3x3/2 to 8x8 0.66-0.94, to
 * 4x4 1.0-1.3; 1x1 on 16x16 and up 0.3-0.6, on 8x8 0.6-1.6, on 4x4 1.0-3.0). So: bf16 on at least
 * 16 output positions (3x3 stride 1), 64 (strided) or 128 (1x1).
 */
export const bf16FilterGradientPays = (g: DnnlConvShape): boolean => {
  const positions = g.oh * g.ow;
  if (g.kh * g.kw === 1) return positions >= 128;
  return positions >= (g.sh * g.sw === 1 ? 16 : 64);
};

/**
 * Switches for side-by-side measurements of the bf16 path in one process (bench/precision_bench.ts);
 * training leaves them at their defaults.
 */
export const bf16Tuning = {
  /** A layer's input-gradient and filter-gradient convolutions share one bf16 copy of dy. */
  shareDy: true,
  /** Which filter gradients run in bf16: where `bf16FilterGradientPays` (`rule`), or all, or none. */
  filterGradient: "rule" as "rule" | "bf16" | "fp32",
};

/** Whether a filter gradient of this shape runs in bf16 under `precision: bf16` (`bf16Tuning.filterGradient`). */
export const filterGradientInBf16 = (g: DnnlConvShape): boolean =>
  bf16Tuning.filterGradient === "rule" ? bf16FilterGradientPays(g) : bf16Tuning.filterGradient === "bf16";

/** Whether a call runs in bf16: asked for, and a filter gradient only where it pays. */
export const convPrecision = (direction: DnnlDirection, g: DnnlConvShape): "fp32" | "bf16" =>
  activeKernelSettings().precision === "bf16" &&
    (direction !== "backwardWeights" || filterGradientInBf16(g))
    ? "bf16"
    : "fp32";
