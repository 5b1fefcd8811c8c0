/**
 * Element-wise float32 arithmetic through oneDNN, for backend/residual_kernels.ts: the sum of two
 * tensors of one shape (optionally followed by ReLU, fused as a post-op) and ReLU's gradient from
 * its output. These run on oneDNN's threads with its vector kernels, where the wasm backend's
 * own Add, Relu, Step and Multiply run on one thread.
 *
 * The data is viewed as one dense row of `size` floats, so any layout of the tensors works as long
 * as all operands share it (TF.js tensors are dense and row-major). One primitive per size and
 * operation, created once; each call only points its memory objects at the tensors.
 */
import { activeThreads } from "./kernel_settings.ts";
import type { DnnlContext } from "./onednn_context.ts";
import {
  ARG_DIFF_DST,
  ARG_DIFF_SRC,
  ARG_DST,
  ARG_FROM,
  ARG_SRC,
  ARG_SRC_1,
  ARG_TO,
  DNNL_BF16,
  DNNL_BINARY_ADD,
  DNNL_ELTWISE_RELU,
  DNNL_ELTWISE_RELU_USE_DST_FOR_BWD,
  DNNL_F32,
  DNNL_FORWARD_TRAINING,
  OP_DESC_BYTES,
} from "./onednn_ffi.ts";

/** The element type of every operand of a call: float32, or bfloat16 (oneDNN computes in fp32 and rounds the result). */
export type ElementType = "f32" | "bf16";

export interface DnnlElementwise {
  /** out = a + b, or max(a + b, 0) with `relu`, over `size` values (`out` may be `a` or `b`). */
  add(
    size: number,
    relu: boolean,
    a: Deno.PointerValue,
    b: Deno.PointerValue,
    out: Deno.PointerValue,
    type?: ElementType,
  ): void;
  /** dx = dy where y > 0, else 0: ReLU's gradient from its output y, over `size` values. */
  reluBackward(
    size: number,
    dy: Deno.PointerValue,
    y: Deno.PointerValue,
    dx: Deno.PointerValue,
    type?: ElementType,
  ): void;
  /** `size` values converted from one element type to the other (bf16 rounds to nearest even). */
  convert(size: number, from: ElementType, source: Deno.PointerValue, target: Deno.PointerValue): void;
}

/** A primitive and the memory objects of its arguments, in the order the call gives the pointers. */
interface Plan {
  readonly primitive: Deno.PointerValue;
  readonly memories: readonly Deno.PointerValue[];
  readonly args: BigUint64Array;
}

export const makeDnnlElementwise = (context: DnnlContext): DnnlElementwise => {
  const { d, engine, stream, ok, slot, ptr, handle, memoryDesc, memory, primitiveDesc, primitive, execArgs } =
    context;
  const dataType = (type: ElementType) => type === "bf16" ? DNNL_BF16 : DNNL_F32;
  const row = (size: number, type: ElementType = "f32") =>
    memoryDesc([1, size, 1, 1], [size, 1, 1, 1], dataType(type));
  const planOf = (pd: Deno.PointerValue, md: Uint8Array, argIds: readonly number[]): Plan => {
    const memories = argIds.map(() => memory(md));
    return {
      primitive: primitive(pd),
      memories,
      args: execArgs(argIds.map((id, i) => [id, memories[i]!] as const)),
    };
  };
  const run = (plan: Plan, pointers: readonly Deno.PointerValue[]) => {
    plan.memories.forEach((m, i) => d.dnnl_memory_set_data_handle(m, pointers[i]!));
    ok(
      d.dnnl_primitive_execute(plan.primitive, stream, plan.args.length / 2, ptr(plan.args)),
      "dnnl_primitive_execute",
    );
    ok(d.dnnl_stream_wait(stream), "dnnl_stream_wait");
  };
  const plans = new Map<string, Plan>();
  const cached = (key: string, make: () => Plan) => {
    // A primitive books its scratchpad for the threads at its creation: one per thread count.
    const full = `${activeThreads()}:${key}`;
    let plan = plans.get(full);
    if (plan === undefined) {
      plan = make();
      plans.set(full, plan);
    }
    return plan;
  };

  const addPlan = (size: number, relu: boolean, type: ElementType) =>
    cached(`add:${size}:${relu}:${type}`, () => {
      const md = row(size, type);
      const desc = new Uint8Array(OP_DESC_BYTES);
      ok(d.dnnl_binary_desc_init(ptr(desc), DNNL_BINARY_ADD, ptr(md), ptr(md), ptr(md)), "dnnl binary desc");
      let attr: Deno.PointerValue = null;
      if (relu) {
        const postOps = slot();
        ok(d.dnnl_post_ops_create(ptr(postOps)), "dnnl_post_ops_create");
        ok(d.dnnl_post_ops_append_eltwise(handle(postOps), 1, DNNL_ELTWISE_RELU, 0, 0), "dnnl post-op relu");
        const attrSlot = slot();
        ok(d.dnnl_primitive_attr_create(ptr(attrSlot)), "dnnl_primitive_attr_create");
        attr = handle(attrSlot);
        ok(d.dnnl_primitive_attr_set_post_ops(attr, handle(postOps)), "dnnl_primitive_attr_set_post_ops");
      }
      return planOf(primitiveDesc(desc, null, attr), md, [ARG_SRC, ARG_SRC_1, ARG_DST]);
    });

  const reluBackwardPlan = (size: number, type: ElementType) =>
    cached(`reluBackward:${size}:${type}`, () => {
      const md = row(size, type);
      const forward = new Uint8Array(OP_DESC_BYTES);
      ok(
        d.dnnl_eltwise_forward_desc_init(
          ptr(forward),
          DNNL_FORWARD_TRAINING,
          DNNL_ELTWISE_RELU_USE_DST_FOR_BWD,
          ptr(md),
          0,
          0,
        ),
        "dnnl eltwise forward desc",
      );
      const backward = new Uint8Array(OP_DESC_BYTES);
      ok(
        d.dnnl_eltwise_backward_desc_init(
          ptr(backward),
          DNNL_ELTWISE_RELU_USE_DST_FOR_BWD,
          ptr(md),
          ptr(md),
          0,
          0,
        ),
        "dnnl eltwise backward desc",
      );
      const pd = primitiveDesc(backward, primitiveDesc(forward, null));
      return planOf(pd, md, [ARG_DIFF_DST, ARG_DST, ARG_DIFF_SRC]);
    });

  const convertPlan = (size: number, from: ElementType) =>
    cached(`convert:${size}:${from}`, () => {
      const source = row(size, from);
      const target = row(size, from === "f32" ? "bf16" : "f32");
      const s = slot();
      ok(
        d.dnnl_reorder_primitive_desc_create(ptr(s), ptr(source), engine, ptr(target), engine, null),
        "dnnl reorder desc",
      );
      const memories = [memory(source), memory(target)];
      return {
        primitive: primitive(handle(s)),
        memories,
        args: execArgs([[ARG_FROM, memories[0]!], [ARG_TO, memories[1]!]]),
      };
    });

  return {
    add: (size, relu, a, b, out, type = "f32") => run(addPlan(size, relu, type), [a, b, out]),
    reluBackward: (size, dy, y, dx, type = "f32") => run(reluBackwardPlan(size, type), [dy, y, dx]),
    convert: (size, from, source, target) => run(convertPlan(size, from), [source, target]),
  };
};
