/**
 * Training-mode batch normalisation (+ fused ReLU) through oneDNN on NHWC
 * memory, for backend/batch_norm_kernels.ts: one primitive per shape, created
 * once; each call only points its memory objects at the tensors.
 */
import { kernelInvariant } from "./invariant.ts";
import { activeThreads } from "./kernel_settings.ts";
import type { DnnlContext } from "./onednn_context.ts";
import {
  ARG_DIFF_DST,
  ARG_DIFF_SCALE,
  ARG_DIFF_SHIFT,
  ARG_DIFF_SRC,
  ARG_DST,
  ARG_MEAN,
  ARG_SCALE,
  ARG_SHIFT,
  ARG_SRC,
  ARG_VARIANCE,
  ARG_WORKSPACE,
  DNNL_BACKWARD,
  DNNL_BF16,
  DNNL_F32,
  DNNL_FORWARD_TRAINING,
  DNNL_FUSE_NORM_RELU,
  DNNL_USE_GLOBAL_STATS,
  DNNL_USE_SCALE,
  DNNL_USE_SHIFT,
  OP_DESC_BYTES,
  QUERY_EXEC_ARG_MD,
} from "./onednn_ffi.ts";

/** Pointers of one batch-norm forward call; `workspace` only with relu (`workspaceBytes` bytes). */
export interface BatchNormForwardPointers {
  readonly x: Deno.PointerValue;
  readonly gamma: Deno.PointerValue;
  readonly beta: Deno.PointerValue;
  readonly y: Deno.PointerValue;
  readonly mean: Deno.PointerValue;
  readonly variance: Deno.PointerValue;
  readonly workspace: Deno.PointerValue | undefined;
}

export interface BatchNormBackwardPointers {
  readonly x: Deno.PointerValue;
  readonly mean: Deno.PointerValue;
  readonly variance: Deno.PointerValue;
  readonly gamma: Deno.PointerValue;
  readonly beta: Deno.PointerValue;
  readonly workspace: Deno.PointerValue | undefined;
  readonly dy: Deno.PointerValue;
  readonly dx: Deno.PointerValue;
  readonly dgamma: Deno.PointerValue;
  readonly dbeta: Deno.PointerValue;
}

export interface BatchNormShape {
  /** Values per channel: N·H·W. */
  readonly rows: number;
  /** H and W of NHWC data (1 and 1 for [N, C]). */
  readonly height: number;
  readonly width: number;
  readonly channels: number;
  readonly epsilon: number;
  readonly relu: boolean;
  /** The data (x, y, dx, dy) in bfloat16 (statistics, scale and shift stay fp32); fp32 when omitted. */
  readonly bf16?: boolean;
}

export interface DnnlBatchNorm {
  /** Bytes of the ReLU workspace the forward writes and the backward reads (0 without relu). */
  workspaceBytes(shape: BatchNormShape): number;
  /**
   * y = [relu](gamma (x − mean)/√(var + eps) + beta), with the batch mean and biased
   * variance, written to `mean` and `variance`; with `givenStatistics`, read from them
   * instead (synchronised batch norm's global statistics).
   */
  forward(shape: BatchNormShape, p: BatchNormForwardPointers, givenStatistics?: boolean): void;
  /** dx, dgamma, dbeta from dy (the gradient of y) and the forward's statistics. */
  backward(shape: BatchNormShape, p: BatchNormBackwardPointers): void;
}

/** oneDNN batch normalisation on the context's engine and stream. */
export const makeDnnlBatchNorm = (context: DnnlContext): DnnlBatchNorm => {
  const { d, engine, stream, ok, slot, ptr, handle, memoryDesc, primitiveDesc, primitive, execArgs } =
    context;

  /** A primitive whose every argument is a memory object made from the descriptor it queries. */
  interface ArgPlan {
    readonly primitive: Deno.PointerValue;
    readonly memories: ReadonlyMap<number, Deno.PointerValue>;
    readonly args: BigUint64Array;
    readonly workspaceBytes: number;
  }
  const argPlan = (pd: Deno.PointerValue, argIds: readonly number[]): ArgPlan => {
    const memories = new Map<number, Deno.PointerValue>();
    for (const id of argIds) {
      const md = d.dnnl_primitive_desc_query_md(pd, QUERY_EXEC_ARG_MD, id);
      kernelInvariant(md !== null, () => `dnnl: no memory desc for argument ${id}`);
      const s = slot();
      ok(d.dnnl_memory_create(ptr(s), md, engine, null), "dnnl_memory_create");
      memories.set(id, handle(s));
    }
    const workspace = argIds.includes(ARG_WORKSPACE)
      ? Number(
        d.dnnl_memory_desc_get_size(d.dnnl_primitive_desc_query_md(pd, QUERY_EXEC_ARG_MD, ARG_WORKSPACE)),
      )
      : 0;
    return {
      primitive: primitive(pd),
      memories,
      args: execArgs(argIds.map((id) => [id, memories.get(id)!] as const)),
      workspaceBytes: workspace,
    };
  };
  const runPlan = (plan: ArgPlan, pointers: ReadonlyMap<number, Deno.PointerValue>) => {
    for (const [id, memory] of plan.memories) d.dnnl_memory_set_data_handle(memory, pointers.get(id)!);
    ok(
      d.dnnl_primitive_execute(plan.primitive, stream, plan.args.length / 2, ptr(plan.args)),
      "dnnl_primitive_execute",
    );
    ok(d.dnnl_stream_wait(stream), "dnnl_stream_wait");
  };

  /** Per shape: the forward (statistics computed or, synchronised batch norm's, given) and the backward. */
  const bnPlans = new Map<string, { forward: ArgPlan; givenStats: () => ArgPlan; backward: ArgPlan }>();
  const bnPlan = (shape: BatchNormShape) => {
    const key = `${activeThreads()}:${shape.rows},${shape.height},${shape.width},${shape.channels},` +
      `${shape.epsilon},${shape.relu},${shape.bf16 === true}`;
    let plan = bnPlans.get(key);
    if (plan !== undefined) return plan;
    // NHWC (oneDNN's nspc: its JIT kernels), [rows, C] as N = rows, H = W = 1.
    const { channels: c, height: h, width: w } = shape;
    const n = shape.rows / (h * w);
    const data = memoryDesc(
      [n, c, h, w],
      [h * w * c, 1, w * c, c],
      shape.bf16 === true ? DNNL_BF16 : DNNL_F32,
    );
    const flags = DNNL_USE_SCALE | DNNL_USE_SHIFT | (shape.relu ? DNNL_FUSE_NORM_RELU : 0);
    const forwardPd = (extraFlags: number) => {
      const fdesc = new Uint8Array(OP_DESC_BYTES);
      ok(
        d.dnnl_batch_normalization_forward_desc_init(
          ptr(fdesc),
          DNNL_FORWARD_TRAINING,
          ptr(data),
          shape.epsilon,
          flags | extraFlags,
        ),
        "dnnl batch normalization forward desc",
      );
      return primitiveDesc(fdesc, null);
    };
    const computedStatsPd = forwardPd(0);
    const bdesc = new Uint8Array(OP_DESC_BYTES);
    ok(
      d.dnnl_batch_normalization_backward_desc_init(
        ptr(bdesc),
        DNNL_BACKWARD,
        ptr(data),
        ptr(data),
        shape.epsilon,
        flags,
      ),
      "dnnl batch normalization backward desc",
    );
    const backwardPd = primitiveDesc(bdesc, computedStatsPd);
    const workspace = shape.relu ? [ARG_WORKSPACE] : [];
    // oneDNN 2.6 counts the shift among the backward's inputs (it reads no value of it).
    const forwardArgs = [ARG_SRC, ARG_DST, ARG_MEAN, ARG_VARIANCE, ARG_SCALE, ARG_SHIFT, ...workspace];
    let givenStats: ArgPlan | undefined;
    plan = {
      forward: argPlan(computedStatsPd, forwardArgs),
      // Made on first use (synchronised runs only); the backward reads its fused-ReLU workspace too.
      givenStats: () => givenStats ??= argPlan(forwardPd(DNNL_USE_GLOBAL_STATS), forwardArgs),
      backward: argPlan(backwardPd, [
        ARG_SRC,
        ARG_MEAN,
        ARG_VARIANCE,
        ARG_DIFF_DST,
        ARG_SCALE,
        ARG_SHIFT,
        ...workspace,
        ARG_DIFF_SRC,
        ARG_DIFF_SCALE,
        ARG_DIFF_SHIFT,
      ]),
    };
    bnPlans.set(key, plan);
    return plan;
  };
  const batchNorm: DnnlBatchNorm = {
    workspaceBytes: (shape) => bnPlan(shape).forward.workspaceBytes,
    forward: (shape, p, givenStatistics = false) => {
      const pointers = new Map<number, Deno.PointerValue>([
        [ARG_SRC, p.x],
        [ARG_DST, p.y],
        [ARG_MEAN, p.mean],
        [ARG_VARIANCE, p.variance],
        [ARG_SCALE, p.gamma],
        [ARG_SHIFT, p.beta],
      ]);
      if (shape.relu) pointers.set(ARG_WORKSPACE, p.workspace!);
      runPlan(givenStatistics ? bnPlan(shape).givenStats() : bnPlan(shape).forward, pointers);
    },
    backward: (shape, p) => {
      const pointers = new Map<number, Deno.PointerValue>([
        [ARG_SRC, p.x],
        [ARG_MEAN, p.mean],
        [ARG_VARIANCE, p.variance],
        [ARG_DIFF_DST, p.dy],
        [ARG_SCALE, p.gamma],
        [ARG_SHIFT, p.beta],
        [ARG_DIFF_SRC, p.dx],
        [ARG_DIFF_SCALE, p.dgamma],
        [ARG_DIFF_SHIFT, p.dbeta],
      ]);
      if (shape.relu) pointers.set(ARG_WORKSPACE, p.workspace!);
      runPlan(bnPlan(shape).backward, pointers);
    },
  };
  return batchNorm;
};
