/**
 * oneDNN convolutions whose activations are bfloat16 on both sides, for the bf16 trunk
 * (backend/bf16_trunk.ts): x and y (and dx, dy) are bf16 NHWC memory, the weights fp32 HWIO
 * (rounded to bf16 in oneDNN's blocked layout on each call), the filter gradient fp32 HWIO.
 * backend/onednn.ts's convolutions, by contrast, read and write fp32 activations (TF.js tensors).
 *
 * Where oneDNN 2.6's bf16 filter gradient is slow (`filterGradientInBf16`), that one direction
 * runs in fp32 on fp32 copies of x and dy, written to a scratch buffer the caller gives.
 */
import { kernelInvariant } from "./invariant.ts";
import { activeThreads } from "./kernel_settings.ts";
import type { DnnlContext } from "./onednn_context.ts";
import {
  type DnnlConvShape,
  type DnnlDirection,
  filterGradientInBf16,
  overrunsScratchpad,
} from "./onednn_conv_shape.ts";
import {
  anyWeightsDesc,
  convolutionPd,
  convolutionWeights,
  destinationDesc,
  plainWeightsDesc,
  type Reorder,
  reorder,
  sourceDesc,
} from "./onednn_conv_desc.ts";
import {
  ARG_DIFF_DST,
  ARG_DIFF_SRC,
  ARG_DIFF_WEIGHTS,
  ARG_DST,
  ARG_SRC,
  ARG_WEIGHTS,
  DNNL_BF16,
  DNNL_F32,
} from "./onednn_ffi.ts";

export interface DnnlBf16Conv {
  /** Whether oneDNN takes all three directions of this shape on bf16 activations (builds them). */
  supports(g: DnnlConvShape): boolean;
  /** y = x * w: x, y bf16; w fp32 HWIO. */
  forward(g: DnnlConvShape, x: Deno.PointerValue, w: Deno.PointerValue, y: Deno.PointerValue): void;
  /** dx from dy and w: dy, dx bf16; w fp32 HWIO. */
  backwardData(g: DnnlConvShape, dy: Deno.PointerValue, w: Deno.PointerValue, dx: Deno.PointerValue): void;
  /** Bytes of the scratch `backwardWeights` needs for fp32 copies of x and dy (0 where it runs on bf16). */
  scratchBytes(g: DnnlConvShape): number;
  /** dw (fp32 HWIO) from x and dy (bf16); `scratch` holds `scratchBytes(g)` bytes where that is not 0. */
  backwardWeights(
    g: DnnlConvShape,
    x: Deno.PointerValue,
    dy: Deno.PointerValue,
    dw: Deno.PointerValue,
    scratch: Deno.PointerValue | undefined,
  ): void;
}

interface Plan {
  readonly primitive: Deno.PointerValue;
  readonly args: BigUint64Array;
  /** The activation-side memory objects: x (or dx) and y (or dy). */
  readonly x: Deno.PointerValue;
  readonly y: Deno.PointerValue;
  /** The caller's plain HWIO weights (or filter gradient), and the reorder to or from oneDNN's layout, if any. */
  readonly w: Deno.PointerValue;
  readonly weights: Reorder | undefined;
  /** Kept alive with the plan: oneDNN holds a raw pointer to the blocked weights' storage. */
  readonly storage: Uint8Array | undefined;
  /** fp32 filter gradient only: bf16 x and dy to the fp32 copies the convolution reads. */
  readonly upcasts: readonly [Reorder, Reorder] | undefined;
  readonly scratchBytes: number;
}

export const makeDnnlBf16Conv = (context: DnnlContext): DnnlBf16Conv => {
  const { d, stream, ok, ptr, memory, primitive, execArgs } = context;
  const build = (direction: DnnlDirection, g: DnnlConvShape): Plan => {
    const fp32Filter = direction === "backwardWeights" && !filterGradientInBf16(g);
    const type = fp32Filter ? DNNL_F32 : DNNL_BF16;
    const [src, dst] = [sourceDesc(context, g, type), destinationDesc(context, g, type)];
    const weights = anyWeightsDesc(context, g, type);
    const forwardPd = convolutionPd(context, "forward", g, src, weights, dst, null);
    const pd = direction === "forward" ? forwardPd : convolutionPd(
      context,
      direction,
      g,
      src,
      direction === "backwardWeights" ? anyWeightsDesc(context, g, DNNL_F32) : weights,
      dst,
      forwardPd,
    );
    const w = convolutionWeights(context, pd, direction, plainWeightsDesc(context, g));
    const x = memory(src);
    const y = memory(dst);
    let upcasts: readonly [Reorder, Reorder] | undefined;
    if (fp32Filter) {
      const [srcBf16, dstBf16] = [sourceDesc(context, g, DNNL_BF16), destinationDesc(context, g, DNNL_BF16)];
      upcasts = [
        reorder(context, ptr(srcBf16), ptr(src), memory(srcBf16), x),
        reorder(context, ptr(dstBf16), ptr(dst), memory(dstBf16), y),
      ];
    }
    const args = direction === "forward"
      ? execArgs([[ARG_SRC, x], [ARG_WEIGHTS, w.memory], [ARG_DST, y]])
      : direction === "backwardData"
      ? execArgs([[ARG_DIFF_SRC, x], [ARG_WEIGHTS, w.memory], [ARG_DIFF_DST, y]])
      : execArgs([[ARG_SRC, x], [ARG_DIFF_WEIGHTS, w.memory], [ARG_DIFF_DST, y]]);
    return {
      primitive: primitive(pd),
      args,
      x,
      y,
      w: w.plain,
      weights: w.reorder,
      storage: w.storage,
      upcasts,
      scratchBytes: fp32Filter ? 4 * g.n * (g.h * g.w * g.ci + g.oh * g.ow * g.co) : 0,
    };
  };

  const plans = new Map<string, Plan | null>();
  const planOf = (direction: DnnlDirection, g: DnnlConvShape): Plan | null => {
    const key =
      `${activeThreads()}:${direction}:${direction === "backwardWeights" && filterGradientInBf16(g)}:` +
      [
        g.n,
        g.h,
        g.w,
        g.ci,
        g.oh,
        g.ow,
        g.co,
        g.kh,
        g.kw,
        g.sh,
        g.sw,
        g.dh,
        g.dw,
        g.top,
        g.left,
        g.bottom,
        g.right,
      ]
        .join(",");
    let plan = plans.get(key);
    if (plan === undefined) {
      try {
        plan = overrunsScratchpad(direction, g) ? null : build(direction, g);
      } catch {
        plan = null; // a shape oneDNN does not take on bf16 activations
      }
      plans.set(key, plan);
    }
    return plan;
  };
  const execute = (primitiveHandle: Deno.PointerValue, args: BigUint64Array) =>
    ok(
      d.dnnl_primitive_execute(primitiveHandle, stream, args.length / 2, ptr(args)),
      "dnnl_primitive_execute",
    );
  const required = (direction: DnnlDirection, g: DnnlConvShape): Plan => {
    const plan = planOf(direction, g);
    kernelInvariant(
      plan !== null,
      () => `dnnl: no bf16 ${direction} convolution for this shape (check supports first)`,
    );
    return plan;
  };
  /** Forward and input gradient: the plain weights rounded into oneDNN's layout, then the convolution. */
  const withWeightsIn = (plan: Plan, x: Deno.PointerValue, w: Deno.PointerValue, y: Deno.PointerValue) => {
    d.dnnl_memory_set_data_handle(plan.x, x);
    d.dnnl_memory_set_data_handle(plan.y, y);
    d.dnnl_memory_set_data_handle(plan.w, w);
    if (plan.weights !== undefined) execute(plan.weights.primitive, plan.weights.args);
    execute(plan.primitive, plan.args);
    ok(d.dnnl_stream_wait(stream), "dnnl_stream_wait");
  };

  return {
    supports: (g) =>
      (["forward", "backwardData", "backwardWeights"] as const).every((dir) => planOf(dir, g) !== null),
    forward: (g, x, w, y) => withWeightsIn(required("forward", g), x, w, y),
    backwardData: (g, dy, w, dx) => withWeightsIn(required("backwardData", g), dx, w, dy),
    scratchBytes: (g) => required("backwardWeights", g).scratchBytes,
    backwardWeights: (g, x, dy, dw, scratch) => {
      const plan = required("backwardWeights", g);
      if (plan.upcasts !== undefined) {
        kernelInvariant(scratch !== undefined, () => "dnnl: an fp32 filter gradient without its scratch");
        const [xUp, dyUp] = plan.upcasts;
        const xBytes = 4 * g.n * g.h * g.w * g.ci;
        d.dnnl_memory_set_data_handle(xUp.from, x);
        d.dnnl_memory_set_data_handle(plan.x, scratch);
        d.dnnl_memory_set_data_handle(dyUp.from, dy);
        d.dnnl_memory_set_data_handle(plan.y, Deno.UnsafePointer.offset(scratch!, xBytes));
        execute(xUp.primitive, xUp.args);
        execute(dyUp.primitive, dyUp.args);
      } else {
        d.dnnl_memory_set_data_handle(plan.x, x);
        d.dnnl_memory_set_data_handle(plan.y, dy);
      }
      d.dnnl_memory_set_data_handle(plan.w, dw);
      execute(plan.primitive, plan.args);
      if (plan.weights !== undefined) execute(plan.weights.primitive, plan.weights.args);
      ok(d.dnnl_stream_wait(stream), "dnnl_stream_wait");
    },
  };
};
