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
  ARG_DIFF_DST,
  ARG_DIFF_SRC,
  ARG_DIFF_WEIGHTS,
  ARG_DST,
  ARG_FROM,
  ARG_SRC,
  ARG_TO,
  ARG_WEIGHTS,
  DNNL_BF16,
  DNNL_CONVOLUTION_DIRECT,
  DNNL_F32,
  DNNL_FORMAT_TAG_ANY,
  DNNL_FORWARD_TRAINING,
  MEMORY_DESC_BYTES,
  OP_DESC_BYTES,
  QUERY_DIFF_WEIGHTS_MD,
  QUERY_WEIGHTS_MD,
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

/** A reorder whose two sides get their data handles on each call. */
interface Reorder {
  readonly primitive: Deno.PointerValue;
  readonly args: BigUint64Array;
  readonly from: Deno.PointerValue;
  readonly to: Deno.PointerValue;
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
  /** fp32 filter gradient only: bf16 x and dy to the fp32 copies the convolution reads. */
  readonly upcasts: readonly [Reorder, Reorder] | undefined;
  readonly scratchBytes: number;
}

export const makeDnnlBf16Conv = (context: DnnlContext): DnnlBf16Conv => {
  const {
    d,
    engine,
    stream,
    ok,
    slot,
    ptr,
    handle,
    dims,
    memoryDesc,
    memory,
    primitiveDesc,
    primitive,
    execArgs,
  } = context;
  // Blocked weight storage oneDNN holds raw pointers to: kept alive with the plans.
  const storages: Uint8Array[] = [];

  const reorder = (
    from: Deno.PointerValue,
    to: Deno.PointerValue,
    fromMemory: Deno.PointerValue,
    toMemory: Deno.PointerValue,
  ): Reorder => {
    const s = slot();
    ok(d.dnnl_reorder_primitive_desc_create(ptr(s), from, engine, to, engine, null), "dnnl reorder desc");
    return {
      primitive: primitive(handle(s)),
      args: execArgs([[ARG_FROM, fromMemory], [ARG_TO, toMemory]]),
      from: fromMemory,
      to: toMemory,
    };
  };

  const build = (direction: DnnlDirection, g: DnnlConvShape): Plan => {
    const xDims = [g.n, g.ci, g.h, g.w];
    const xStrides = [g.h * g.w * g.ci, 1, g.w * g.ci, g.ci];
    const yDims = [g.n, g.co, g.oh, g.ow];
    const yStrides = [g.oh * g.ow * g.co, 1, g.ow * g.co, g.co];
    const fp32Filter = direction === "backwardWeights" && !filterGradientInBf16(g);
    const type = fp32Filter ? DNNL_F32 : DNNL_BF16;
    const src = memoryDesc(xDims, xStrides, type);
    const dst = memoryDesc(yDims, yStrides, type);
    const plainWeights = memoryDesc([g.co, g.ci, g.kh, g.kw], [1, g.co, g.kw * g.ci * g.co, g.ci * g.co]);
    const anyWeights = (t: number) => {
      const md = new Uint8Array(MEMORY_DESC_BYTES);
      ok(
        d.dnnl_memory_desc_init_by_tag(
          ptr(md),
          4,
          ptr(dims([g.co, g.ci, g.kh, g.kw])),
          t,
          DNNL_FORMAT_TAG_ANY,
        ),
        "dnnl_memory_desc_init_by_tag",
      );
      return md;
    };
    const weights = anyWeights(type);
    const strides = dims([g.sh, g.sw]);
    const dilates = dims([g.dh - 1, g.dw - 1]);
    const padL = dims([g.top, g.left]);
    const padR = dims([g.bottom, g.right]);
    const forwardDesc = new Uint8Array(OP_DESC_BYTES);
    ok(
      d.dnnl_dilated_convolution_forward_desc_init(
        ptr(forwardDesc),
        DNNL_FORWARD_TRAINING,
        DNNL_CONVOLUTION_DIRECT,
        ptr(src),
        ptr(weights),
        null,
        ptr(dst),
        ptr(strides),
        ptr(dilates),
        ptr(padL),
        ptr(padR),
      ),
      "dnnl convolution forward desc",
    );
    let pd = primitiveDesc(forwardDesc, null);
    if (direction === "backwardData") {
      const desc = new Uint8Array(OP_DESC_BYTES);
      ok(
        d.dnnl_dilated_convolution_backward_data_desc_init(
          ptr(desc),
          DNNL_CONVOLUTION_DIRECT,
          ptr(src),
          ptr(weights),
          ptr(dst),
          ptr(strides),
          ptr(dilates),
          ptr(padL),
          ptr(padR),
        ),
        "dnnl convolution backward data desc",
      );
      pd = primitiveDesc(desc, pd);
    } else if (direction === "backwardWeights") {
      const desc = new Uint8Array(OP_DESC_BYTES);
      ok(
        d.dnnl_dilated_convolution_backward_weights_desc_init(
          ptr(desc),
          DNNL_CONVOLUTION_DIRECT,
          ptr(src),
          ptr(anyWeights(DNNL_F32)),
          null,
          ptr(dst),
          ptr(strides),
          ptr(dilates),
          ptr(padL),
          ptr(padR),
        ),
        "dnnl convolution backward weights desc",
      );
      pd = primitiveDesc(desc, pd);
    }
    const weightsOut = direction === "backwardWeights";
    const chosen = d.dnnl_primitive_desc_query_md(
      pd,
      weightsOut ? QUERY_DIFF_WEIGHTS_MD : QUERY_WEIGHTS_MD,
      0,
    );
    kernelInvariant(chosen !== null, () => "dnnl: no weights memory desc");
    const w = memory(plainWeights);
    let convWeights = w;
    let weightsReorder: Reorder | undefined;
    if (d.dnnl_memory_desc_equal(chosen, ptr(plainWeights)) === 0) {
      const storage = new Uint8Array(Number(d.dnnl_memory_desc_get_size(chosen)));
      storages.push(storage);
      const s = slot();
      ok(d.dnnl_memory_create(ptr(s), chosen, engine, ptr(storage)), "dnnl_memory_create");
      convWeights = handle(s);
      weightsReorder = weightsOut
        ? reorder(chosen, ptr(plainWeights), convWeights, w)
        : reorder(ptr(plainWeights), chosen, w, convWeights);
    }
    const x = memory(src);
    const y = memory(dst);
    let upcasts: readonly [Reorder, Reorder] | undefined;
    if (fp32Filter) {
      const [srcBf16, dstBf16] = [
        memoryDesc(xDims, xStrides, DNNL_BF16),
        memoryDesc(yDims, yStrides, DNNL_BF16),
      ];
      upcasts = [
        reorder(ptr(srcBf16), ptr(src), memory(srcBf16), x),
        reorder(ptr(dstBf16), ptr(dst), memory(dstBf16), y),
      ];
    }
    const args = direction === "forward"
      ? execArgs([[ARG_SRC, x], [ARG_WEIGHTS, convWeights], [ARG_DST, y]])
      : direction === "backwardData"
      ? execArgs([[ARG_DIFF_SRC, x], [ARG_WEIGHTS, convWeights], [ARG_DIFF_DST, y]])
      : execArgs([[ARG_SRC, x], [ARG_DIFF_WEIGHTS, convWeights], [ARG_DIFF_DST, y]]);
    return {
      primitive: primitive(pd),
      args,
      x,
      y,
      w,
      weights: weightsReorder,
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
