/**
 * oneDNN (Debian libdnnl2, v2.x C API) through `Deno.dlopen`: convolutions on
 * NHWC / HWIO memory and training-mode batch normalisation, for the wasm
 * backend's native kernels (backend/native_kernels.ts, backend/batch_norm_kernels.ts).
 * Operands are zero-copy pointers into the wasm heap, as for OpenBLAS
 * (backend/openblas.ts).
 */
import { activeKernelSettings, activeThreads, type KernelSettings } from "./kernel_settings.ts";
import { kernelInvariant } from "./invariant.ts";
import { type DnnlBatchNorm, makeDnnlBatchNorm } from "./onednn_batch_norm.ts";
import { type DnnlElementwise, makeDnnlElementwise } from "./onednn_eltwise.ts";
import { makeDnnlContext } from "./onednn_context.ts";
import { type DnnlBf16Conv, makeDnnlBf16Conv } from "./onednn_bf16_conv.ts";
import {
  anyWeightsDesc,
  convolutionPd,
  convolutionWeights,
  type ConvWeights,
  destinationDesc,
  plainWeightsDesc,
  reorder,
  sourceDesc,
} from "./onednn_conv_desc.ts";
import {
  bf16Tuning,
  convPrecision,
  type DnnlConvShape,
  type DnnlDirection,
  overrunsScratchpad,
} from "./onednn_conv_shape.ts";
import {
  ARG_DIFF_DST,
  ARG_DIFF_SRC,
  ARG_DIFF_WEIGHTS,
  ARG_DST,
  ARG_SRC,
  ARG_WEIGHTS,
  DNNL_BF16,
  DNNL_F32,
  dnnlSymbols,
} from "./onednn_ffi.ts";

export type {
  BatchNormBackwardPointers,
  BatchNormForwardPointers,
  BatchNormShape,
  DnnlBatchNorm,
} from "./onednn_batch_norm.ts";

// ---------------------------------------------------------------------------
// oneDNN (Debian libdnnl2, v2.x C API) convolutions on NHWC / HWIO memory.
//
// Memory descriptors are given by strides (no format-tag enums, whose values
// change between versions): logical NCHW dims with NHWC strides, logical OIHW
// weights with HWIO strides. A primitive per (direction, geometry) is created
// once and cached; each call only points its memory objects at the tensors.
// ---------------------------------------------------------------------------

export {
  bf16FilterGradientPays,
  bf16Tuning,
  convPrecision,
  type DnnlConvShape,
  type DnnlDirection,
  filterGradientInBf16,
  overrunsScratchpad,
} from "./onednn_conv_shape.ts";

/**
 * Caller-provided buffers for the bf16 copies of one `run` call: `x` and `dy` for new copies, and
 * `held`, the current address of the buffer `heldDyCopy` named, for a copy of dy that is reused.
 */
export interface CopyBuffers {
  readonly x?: Deno.PointerValue;
  readonly dy?: Deno.PointerValue;
  readonly held?: Deno.PointerValue;
}

/** oneDNN convolutions; `run` returns false when oneDNN cannot take the shape (the caller falls back). */
export interface Dnnl {
  readonly library: string;
  /**
   * forward: (x, w) -> y; backwardData: (dy, w) -> dx; backwardWeights: (x, dy) -> dw.
   * Pointers: x / dx [N, H, W, Ci], w / dw [KH, KW, Ci, Co], y / dy [N, OH, OW, Co].
   * `dyIdentity` (backward directions): an object that names dy's contents for as long as dy
   * lives (the caller's tensor data id). Under bf16 the input-gradient and filter-gradient
   * convolutions of one layer then share one bf16 copy of dy instead of rounding it twice.
   * `copies`: where the bf16 copies go (sized by `copyBytes`; needed only where those are not 0).
   */
  run(
    direction: DnnlDirection,
    shape: DnnlConvShape,
    x: Deno.PointerValue,
    w: Deno.PointerValue,
    y: Deno.PointerValue,
    dyIdentity: object | undefined,
    copies: CopyBuffers,
  ): boolean;
  /** Bytes of the bf16 copies of x and of dy that `run` makes for this call (0 where it runs fp32). */
  copyBytes(direction: DnnlDirection, shape: DnnlConvShape): { readonly x: number; readonly dy: number };
  /**
   * Where the bf16 copy of dy that the next filter gradient may reuse was written (`copies.dy` of
   * an earlier call), or undefined: the caller keeps that buffer alive until it is no longer the held
   * one.
   */
  heldDyCopy(): Deno.PointerValue | undefined;
  /**
   * Batch normalisation in training mode over `rows` rows of `channels` values
   * (NHWC flattened: statistics per channel over every row), with scale and
   * shift, optionally followed by ReLU (whose backward then needs the workspace).
   */
  readonly batchNorm: DnnlBatchNorm;
  /** Same-shape sums (optionally with ReLU), ReLU's gradient and f32 <-> bf16 conversions. */
  readonly elementwise: DnnlElementwise;
  /** Convolutions on bf16 activations (the bf16 trunk, backend/bf16_trunk.ts). */
  readonly bf16Conv: DnnlBf16Conv;
}

let dnnlLoaded: Dnnl | undefined;
let dnnlTried = false;
let dnnlFailure: string | undefined;
let setOmpThreads: ((threads: number) => void) | undefined;

/** Sets OpenMP's thread count once oneDNN is loaded (the backend Layer calls it with the settings' threads). */
export const setDnnlThreads = (threads: number): void => setOmpThreads?.(threads);

const envFlag = (name: string): string | undefined => {
  try {
    return Deno.env.get(name);
  } catch {
    return undefined;
  }
};

/** Loads oneDNN once (libdnnl.so.2 or `SWAV_DNNL_LIB`); undefined when absent or `SWAV_DNNL=0`. */
export const loadDnnl = (): Dnnl | undefined => {
  if (dnnlTried) return dnnlLoaded;
  dnnlTried = true;
  if (envFlag("SWAV_DNNL") === "0") {
    dnnlFailure = "SWAV_DNNL=0";
    return undefined;
  }
  const name = envFlag("SWAV_DNNL_LIB") || "libdnnl.so.2";
  // OpenMP workers that spin after each convolution take the core the main thread needs for the
  // (single-threaded wasm) ops in between; passive waiting is read by libgomp when it loads.
  try {
    if (Deno.env.get("OMP_WAIT_POLICY") === undefined) Deno.env.set("OMP_WAIT_POLICY", "PASSIVE");
  } catch {
    // no --allow-env: libgomp's default
  }
  try {
    const lib = Deno.dlopen(name, dnnlSymbols);
    const d = lib.symbols;
    try {
      // Debian's build runs on OpenMP (libgomp): its thread count is set there.
      const gomp = Deno.dlopen("libgomp.so.1", {
        omp_set_num_threads: { parameters: ["i32"], result: "void" },
      });
      setOmpThreads = (threads) => gomp.symbols.omp_set_num_threads(threads);
      setOmpThreads(activeThreads());
    } catch {
      setOmpThreads = undefined; // another threading runtime: OMP_NUM_THREADS / its default
    }
    const context = makeDnnlContext(d);
    const { stream, ok, ptr, memory, primitive, execArgs } = context;
    const batchNorm = makeDnnlBatchNorm(context);
    const elementwise = makeDnnlElementwise(context);

    /*
     * Weights in the layout the convolution chose. Convolutions created on plain HWIO weights
     * fall back to oneDNN's im2col + gemm; with the weights' format left to oneDNN (`any`) it
     * picks its direct JIT kernels (blocked weights, e.g. OIhw16i16o) on the same NHWC
     * activations, about 3x faster here. The weights are small, so reordering them on each call
     * costs little.
     */

    /**
     * bf16: an fp32 input (x, or dy) rounded into a bf16 copy the convolution reads. TF.js has no
     * bf16 tensors, so the copy lives in a buffer the caller gives (`CopyBuffers`: on the wasm heap,
     * freed after the call, so it takes memory only while needed).
     */
    interface InputCast {
      readonly operand: "x" | "y";
      readonly primitive: Deno.PointerValue;
      readonly args: BigUint64Array;
      /** The fp32 side: its data handle is the caller's pointer. */
      readonly from: Deno.PointerValue;
      /** The bf16 side, the convolution's argument: its data handle is the caller's copy buffer. */
      readonly to: Deno.PointerValue;
      readonly bytes: number;
    }

    interface Plan {
      readonly primitive: Deno.PointerValue;
      readonly args: BigUint64Array;
      /** Memory objects whose handles are the caller's x and y (when not cast). */
      readonly x: Deno.PointerValue;
      readonly y: Deno.PointerValue;
      /** The weights: their reorder runs before the convolution (forward, backward data) or after it. */
      readonly weights: ConvWeights;
      readonly casts: readonly InputCast[];
    }
    /**
     * The bf16 copy of the dy named by `identity` at `pointer`, written at `copy` (the caller's buffer).
     * TF.js runs a layer's input gradient and then its filter gradient on the same dy tensor,
     * which stays alive (and immutable) in between, so the second call reuses the copy.
     */
    let lastDy:
      | { identity: object; pointer: Deno.PointerValue; bytes: number; copy: Deno.PointerValue }
      | undefined;
    const forwardPds = new Map<string, Deno.PointerValue>();
    const plans = new Map<string, Plan | null>();

    const build = (
      direction: DnnlDirection,
      g: DnnlConvShape,
      key: string,
      weightsLayout: KernelSettings["dnnlWeightsLayout"],
      bf16: boolean,
    ): Plan => {
      const [src, dst] = [sourceDesc(context, g, DNNL_F32), destinationDesc(context, g, DNNL_F32)];
      const plain = plainWeightsDesc(context, g);
      // bf16 reads the weights in whatever layout oneDNN picks (they are reordered, and rounded, anyway).
      const anyWts = bf16
        ? anyWeightsDesc(context, g, DNNL_BF16)
        : weightsLayout === "any"
        ? anyWeightsDesc(context, g, DNNL_F32)
        : plain;
      // The filter gradient stays fp32 (accumulated in fp32 by oneDNN's bf16 kernels).
      const diffWts = bf16 ? anyWeightsDesc(context, g, DNNL_F32) : anyWts;
      // bf16: the convolution reads bf16 copies of its inputs and writes its fp32 output directly.
      const srcIn = bf16 ? sourceDesc(context, g, DNNL_BF16) : src;
      const dstIn = bf16 ? destinationDesc(context, g, DNNL_BF16) : dst;
      let forwardPd = forwardPds.get(key);
      if (forwardPd === undefined) {
        forwardPd = convolutionPd(context, "forward", g, srcIn, anyWts, dst, null);
        forwardPds.set(key, forwardPd);
      }
      const pd = direction === "forward"
        ? forwardPd
        : direction === "backwardData"
        ? convolutionPd(context, direction, g, src, anyWts, dstIn, forwardPd)
        : convolutionPd(context, direction, g, srcIn, diffWts, dstIn, forwardPd);
      const casts: InputCast[] = [];
      const cast = (operand: "x" | "y", from: Uint8Array, to: Uint8Array, count: number) => {
        const r = reorder(context, ptr(from), ptr(to), memory(from), memory(to));
        casts.push({ ...r, operand, bytes: 2 * count });
        return r.to;
      };
      const x = bf16 && direction !== "backwardData"
        ? cast("x", src, srcIn, g.n * g.h * g.w * g.ci)
        : memory(src);
      const y = bf16 && direction !== "forward"
        ? cast("y", dst, dstIn, g.n * g.oh * g.ow * g.co)
        : memory(dst);
      const weights = convolutionWeights(context, pd, direction, plain);
      const args = direction === "forward"
        ? execArgs([[ARG_SRC, x], [ARG_WEIGHTS, weights.memory], [ARG_DST, y]])
        : direction === "backwardData"
        ? execArgs([[ARG_DIFF_SRC, x], [ARG_WEIGHTS, weights.memory], [ARG_DIFF_DST, y]])
        : execArgs([[ARG_SRC, x], [ARG_DIFF_WEIGHTS, weights.memory], [ARG_DIFF_DST, y]]);
      return { primitive: primitive(pd), args, x, y, weights, casts };
    };
    dnnlLoaded = {
      library: name,
      batchNorm,
      elementwise,
      bf16Conv: makeDnnlBf16Conv(context),
      copyBytes: (direction, g) =>
        convPrecision(direction, g) === "fp32" ? { x: 0, dy: 0 } : {
          x: direction === "backwardData" ? 0 : 2 * g.n * g.h * g.w * g.ci,
          dy: direction === "forward" ? 0 : 2 * g.n * g.oh * g.ow * g.co,
        },
      heldDyCopy: () => lastDy?.copy,
      run: (direction, g, x, w, y, dyIdentity, copies) => {
        const shapeKey = [g.n, g.h, g.w, g.ci, g.oh, g.ow, g.co, g.kh, g.kw, g.sh, g.sw, g.dh, g.dw]
          .concat([g.top, g.left, g.bottom, g.right]).join(",");
        const weightsLayout = activeKernelSettings().dnnlWeightsLayout;
        const precision = convPrecision(direction, g);
        // A primitive books its scratchpad for the threads at its creation: one per thread count.
        const common = `${activeThreads()}:${weightsLayout}:${precision}:${shapeKey}`;
        const key = `${direction}:${common}`;
        let plan = plans.get(key);
        if (plan === undefined) {
          try {
            plan = overrunsScratchpad(direction, g)
              ? null
              : build(direction, g, common, weightsLayout, precision === "bf16");
          } catch {
            plan = null; // a shape oneDNN does not take: the caller falls back, every time
          }
          plans.set(key, plan);
        }
        if (plan === null) return false;
        const execute = (p: Deno.PointerValue, args: BigUint64Array) =>
          ok(d.dnnl_primitive_execute(p, stream, args.length / 2, ptr(args)), "dnnl_primitive_execute");
        for (const c of plan.casts) {
          d.dnnl_memory_set_data_handle(c.from, c.operand === "x" ? x : y);
          if (c.operand === "y") {
            const held = bf16Tuning.shareDy && lastDy !== undefined && dyIdentity !== undefined &&
              lastDy.identity === dyIdentity && Deno.UnsafePointer.equals(lastDy.pointer, y) &&
              lastDy.bytes === c.bytes;
            if (held) {
              d.dnnl_memory_set_data_handle(c.to, copies.held ?? lastDy!.copy);
              continue;
            }
            const copy = copies.dy;
            kernelInvariant(copy !== undefined, () => "dnnl: a bf16 call without a buffer for dy's copy");
            d.dnnl_memory_set_data_handle(c.to, copy);
            lastDy = undefined;
            execute(c.primitive, c.args);
            if (dyIdentity !== undefined) lastDy = { identity: dyIdentity, pointer: y, bytes: c.bytes, copy };
            continue;
          }
          kernelInvariant(copies.x !== undefined, () => "dnnl: a bf16 call without a buffer for x's copy");
          d.dnnl_memory_set_data_handle(c.to, copies.x);
          execute(c.primitive, c.args);
        }
        if (!plan.casts.some((c) => c.operand === "x")) d.dnnl_memory_set_data_handle(plan.x, x);
        if (!plan.casts.some((c) => c.operand === "y")) d.dnnl_memory_set_data_handle(plan.y, y);
        const weightsReorder = plan.weights.reorder;
        d.dnnl_memory_set_data_handle(plan.weights.plain, w);
        if (weightsReorder !== undefined && direction !== "backwardWeights") {
          execute(weightsReorder.primitive, weightsReorder.args);
        }
        execute(plan.primitive, plan.args);
        if (weightsReorder !== undefined && direction === "backwardWeights") {
          execute(weightsReorder.primitive, weightsReorder.args);
        }
        ok(d.dnnl_stream_wait(stream), "dnnl_stream_wait");
        return true;
      },
    };
    return dnnlLoaded;
  } catch (error) {
    dnnlFailure = error instanceof Error ? error.message.split("\n")[0] : String(error);
    return undefined;
  }
};

/** oneDNN status, for benchmark headers. */
export const dnnlInfo = (): { active: boolean; library?: string; reason?: string } => {
  const dnnl = loadDnnl();
  if (dnnl === undefined) return { active: false, reason: dnnlFailure ?? "not loaded" };
  if (!activeKernelSettings().blas) return { active: false, library: dnnl.library, reason: "disabled" };
  return { active: true, library: dnnl.library };
};
