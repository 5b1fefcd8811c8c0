/**
 * The oneDNN descriptors of a convolution, shared by the convolutions on fp32 activations
 * (backend/onednn.ts) and on bf16 activations (backend/onednn_bf16_conv.ts): memory descriptors of
 * NHWC activations and HWIO weights by strides, weights in the layout oneDNN picks, the primitive
 * descriptor of each direction, and the reorder between the caller's plain weights and oneDNN's.
 */
import { kernelInvariant } from "./invariant.ts";
import type { DnnlContext } from "./onednn_context.ts";
import type { DnnlConvShape, DnnlDirection } from "./onednn_conv_shape.ts";
import {
  ARG_FROM,
  ARG_TO,
  DNNL_CONVOLUTION_DIRECT,
  DNNL_FORMAT_TAG_ANY,
  DNNL_FORWARD_TRAINING,
  MEMORY_DESC_BYTES,
  OP_DESC_BYTES,
  QUERY_DIFF_WEIGHTS_MD,
  QUERY_WEIGHTS_MD,
} from "./onednn_ffi.ts";

/** x (or dx) [N, H, W, Ci] of element `type`: logical NCHW dims with NHWC strides. */
export const sourceDesc = (context: DnnlContext, g: DnnlConvShape, type: number): Uint8Array =>
  context.memoryDesc([g.n, g.ci, g.h, g.w], [g.h * g.w * g.ci, 1, g.w * g.ci, g.ci], type);

/** y (or dy) [N, OH, OW, Co] of element `type`. */
export const destinationDesc = (context: DnnlContext, g: DnnlConvShape, type: number): Uint8Array =>
  context.memoryDesc([g.n, g.co, g.oh, g.ow], [g.oh * g.ow * g.co, 1, g.ow * g.co, g.co], type);

/** The caller's fp32 weights [KH, KW, Ci, Co]: logical OIHW dims with HWIO strides. */
export const plainWeightsDesc = (context: DnnlContext, g: DnnlConvShape): Uint8Array =>
  context.memoryDesc([g.co, g.ci, g.kh, g.kw], [1, g.co, g.kw * g.ci * g.co, g.ci * g.co]);

/** Weights of element `type` in whatever layout oneDNN picks for the convolution (`any`). */
export const anyWeightsDesc = (context: DnnlContext, g: DnnlConvShape, type: number): Uint8Array => {
  const { d, ok, ptr, dims } = context;
  const md = new Uint8Array(MEMORY_DESC_BYTES);
  ok(
    d.dnnl_memory_desc_init_by_tag(
      ptr(md),
      4,
      ptr(dims([g.co, g.ci, g.kh, g.kw])),
      type,
      DNNL_FORMAT_TAG_ANY,
    ),
    "dnnl_memory_desc_init_by_tag",
  );
  return md;
};

/**
 * The primitive descriptor of one direction of the convolution `g` on the given memory descriptors:
 * forward (x, w, y), backward data (dx, w, dy), backward weights (x, dw, dy). The backward ones take
 * the forward's primitive descriptor as their hint.
 */
export const convolutionPd = (
  context: DnnlContext,
  direction: DnnlDirection,
  g: DnnlConvShape,
  x: Uint8Array,
  w: Uint8Array,
  y: Uint8Array,
  forwardHint: Deno.PointerValue,
): Deno.PointerValue => {
  const { d, ok, ptr, dims, primitiveDesc } = context;
  const desc = new Uint8Array(OP_DESC_BYTES);
  const geometry = [
    ptr(dims([g.sh, g.sw])),
    ptr(dims([g.dh - 1, g.dw - 1])),
    ptr(dims([g.top, g.left])),
    ptr(dims([g.bottom, g.right])),
  ] as const;
  if (direction === "forward") {
    ok(
      d.dnnl_dilated_convolution_forward_desc_init(
        ptr(desc),
        DNNL_FORWARD_TRAINING,
        DNNL_CONVOLUTION_DIRECT,
        ptr(x),
        ptr(w),
        null,
        ptr(y),
        ...geometry,
      ),
      "dnnl convolution forward desc",
    );
    return primitiveDesc(desc, null);
  }
  if (direction === "backwardData") {
    ok(
      d.dnnl_dilated_convolution_backward_data_desc_init(
        ptr(desc),
        DNNL_CONVOLUTION_DIRECT,
        ptr(x),
        ptr(w),
        ptr(y),
        ...geometry,
      ),
      "dnnl convolution backward data desc",
    );
    return primitiveDesc(desc, forwardHint);
  }
  ok(
    d.dnnl_dilated_convolution_backward_weights_desc_init(
      ptr(desc),
      DNNL_CONVOLUTION_DIRECT,
      ptr(x),
      ptr(w),
      null,
      ptr(y),
      ...geometry,
    ),
    "dnnl convolution backward weights desc",
  );
  return primitiveDesc(desc, forwardHint);
};

/** A reorder whose two sides get their data handles on each call. */
export interface Reorder {
  readonly primitive: Deno.PointerValue;
  readonly args: BigUint64Array;
  readonly from: Deno.PointerValue;
  readonly to: Deno.PointerValue;
}

/** A reorder from memory `fromMemory` (described by `from`) to `toMemory` (described by `to`). */
export const reorder = (
  context: DnnlContext,
  from: Deno.PointerValue,
  to: Deno.PointerValue,
  fromMemory: Deno.PointerValue,
  toMemory: Deno.PointerValue,
): Reorder => {
  const { d, engine, ok, slot, ptr, handle, primitive, execArgs } = context;
  const s = slot();
  ok(d.dnnl_reorder_primitive_desc_create(ptr(s), from, engine, to, engine, null), "dnnl reorder desc");
  return {
    primitive: primitive(handle(s)),
    args: execArgs([[ARG_FROM, fromMemory], [ARG_TO, toMemory]]),
    from: fromMemory,
    to: toMemory,
  };
};

/** The weights (or filter gradient) a convolution's primitive reads (writes), on the caller's plain ones. */
export interface ConvWeights {
  /** The memory object the convolution's weights argument names. */
  readonly memory: Deno.PointerValue;
  /** The plain HWIO memory object: its data handle is the caller's pointer. */
  readonly plain: Deno.PointerValue;
  /**
   * From the plain weights to oneDNN's layout (before the convolution), or from its filter gradient
   * to the plain one (after it); undefined where oneDNN picked the plain layout itself.
   */
  readonly reorder: Reorder | undefined;
  /** Kept alive with the plan: the blocked copy's storage (oneDNN holds a raw pointer to it). */
  readonly storage: Uint8Array | undefined;
}

/**
 * The weights of primitive descriptor `pd` in the layout it chose, on the plain HWIO weights `plain`:
 * the same memory where it chose that layout, else a blocked copy and the reorder to (or, for the
 * filter gradient, from) it.
 */
export const convolutionWeights = (
  context: DnnlContext,
  pd: Deno.PointerValue,
  direction: DnnlDirection,
  plain: Uint8Array,
): ConvWeights => {
  const { d, engine, ok, slot, ptr, handle, memory } = context;
  const out = direction === "backwardWeights";
  const chosen = d.dnnl_primitive_desc_query_md(pd, out ? QUERY_DIFF_WEIGHTS_MD : QUERY_WEIGHTS_MD, 0);
  kernelInvariant(chosen !== null, () => "dnnl: no weights memory desc");
  const plainMemory = memory(plain);
  if (d.dnnl_memory_desc_equal(chosen, ptr(plain)) !== 0) {
    return { memory: plainMemory, plain: plainMemory, reorder: undefined, storage: undefined };
  }
  const storage = new Uint8Array(Number(d.dnnl_memory_desc_get_size(chosen)));
  const s = slot();
  ok(d.dnnl_memory_create(ptr(s), chosen, engine, ptr(storage)), "dnnl_memory_create");
  const blocked = handle(s);
  return {
    memory: blocked,
    plain: plainMemory,
    reorder: out
      ? reorder(context, chosen, ptr(plain), blocked, plainMemory)
      : reorder(context, ptr(plain), chosen, plainMemory, blocked),
    storage,
  };
};
