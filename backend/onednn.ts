/**
 * oneDNN (Debian libdnnl2, v2.x C API) through `Deno.dlopen`: convolutions on
 * NHWC / HWIO memory and training-mode batch normalisation, for the wasm
 * backend's native kernels (backend/native_kernels.ts, backend/batch_norm_kernels.ts).
 * Operands are zero-copy pointers into the wasm heap, as for OpenBLAS
 * (backend/openblas.ts).
 */
import { activeKernelSettings, activeThreads, type KernelSettings } from "./kernel_settings.ts";
import { kernelInvariant } from "./invariant.ts";
import {
  ARG_DIFF_DST,
  ARG_DIFF_SCALE,
  ARG_DIFF_SHIFT,
  ARG_DIFF_SRC,
  ARG_DIFF_WEIGHTS,
  ARG_DST,
  ARG_FROM,
  ARG_MEAN,
  ARG_SCALE,
  ARG_SHIFT,
  ARG_SRC,
  ARG_TO,
  ARG_VARIANCE,
  ARG_WEIGHTS,
  ARG_WORKSPACE,
  DNNL_BACKWARD,
  DNNL_CONVOLUTION_DIRECT,
  DNNL_CPU,
  DNNL_F32,
  DNNL_FORMAT_TAG_ANY,
  DNNL_FORWARD_TRAINING,
  DNNL_FUSE_NORM_RELU,
  DNNL_STREAM_DEFAULT,
  DNNL_USE_GLOBAL_STATS,
  DNNL_USE_SCALE,
  DNNL_USE_SHIFT,
  dnnlSymbols,
  MEMORY_DESC_BYTES,
  OP_DESC_BYTES,
  QUERY_DIFF_WEIGHTS_MD,
  QUERY_EXEC_ARG_MD,
  QUERY_WEIGHTS_MD,
} from "./onednn_ffi.ts";

// ---------------------------------------------------------------------------
// oneDNN (Debian libdnnl2, v2.x C API) convolutions on NHWC / HWIO memory.
//
// Memory descriptors are given by strides (no format-tag enums, whose values
// change between versions): logical NCHW dims with NHWC strides, logical OIHW
// weights with HWIO strides. A primitive per (direction, geometry) is created
// once and cached; each call only points its memory objects at the tensors.
// ---------------------------------------------------------------------------

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

/** oneDNN convolutions; `run` returns false when oneDNN cannot take the shape (the caller falls back). */
export interface Dnnl {
  readonly library: string;
  /**
   * forward: (x, w) -> y; backwardData: (dy, w) -> dx; backwardWeights: (x, dy) -> dw.
   * Pointers: x / dx [N, H, W, Ci], w / dw [KH, KW, Ci, Co], y / dy [N, OH, OW, Co].
   */
  run(
    direction: DnnlDirection,
    shape: DnnlConvShape,
    x: Deno.PointerValue,
    w: Deno.PointerValue,
    y: Deno.PointerValue,
  ): boolean;
  /**
   * Batch normalisation in training mode over `rows` rows of `channels` values
   * (NHWC flattened: statistics per channel over every row), with scale and
   * shift, optionally followed by ReLU (whose backward then needs the workspace).
   */
  readonly batchNorm: DnnlBatchNorm;
}

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
    const ok = (status: number, what: string) => {
      kernelInvariant(status === 0, () => `${what} failed with dnnl status ${status}`);
    };
    const slot = () => new BigUint64Array(1);
    const ptr = (view: ArrayBufferView) => Deno.UnsafePointer.of(view as unknown as BufferSource);
    const handle = (s: BigUint64Array) => Deno.UnsafePointer.create(s[0]!);
    const engineSlot = slot();
    ok(d.dnnl_engine_create(ptr(engineSlot), DNNL_CPU, 0n), "dnnl_engine_create");
    const engine = handle(engineSlot);
    const streamSlot = slot();
    ok(d.dnnl_stream_create(ptr(streamSlot), engine, DNNL_STREAM_DEFAULT), "dnnl_stream_create");
    const stream = handle(streamSlot);
    const dims = (values: readonly number[]) => BigInt64Array.from(values.map(BigInt));
    const memoryDesc = (logical: number[], strides: number[]) => {
      const md = new Uint8Array(MEMORY_DESC_BYTES);
      ok(
        d.dnnl_memory_desc_init_by_strides(ptr(md), 4, ptr(dims(logical)), DNNL_F32, ptr(dims(strides))),
        "dnnl_memory_desc_init_by_strides",
      );
      return md;
    };
    const memory = (md: Uint8Array) => {
      const s = slot();
      ok(d.dnnl_memory_create(ptr(s), ptr(md), engine, null), "dnnl_memory_create");
      return handle(s);
    };
    const primitiveDesc = (desc: Uint8Array, hint: Deno.PointerValue) => {
      const s = slot();
      ok(d.dnnl_primitive_desc_create(ptr(s), ptr(desc), null, engine, hint), "dnnl_primitive_desc_create");
      return handle(s);
    };
    const primitive = (pd: Deno.PointerValue) => {
      const s = slot();
      ok(d.dnnl_primitive_create(ptr(s), pd), "dnnl_primitive_create");
      return handle(s);
    };

    /** Executes a primitive on the stream with exec args `{id, memory}` (16 bytes each with padding). */
    const execArgs = (pairs: readonly (readonly [number, Deno.PointerValue])[]): BigUint64Array => {
      const args = new BigUint64Array(2 * pairs.length);
      const ints = new Int32Array(args.buffer);
      pairs.forEach(([id, memory], i) => {
        ints[i * 4] = id;
        args[i * 2 + 1] = BigInt(Deno.UnsafePointer.value(memory));
      });
      return args;
    };

    /**
     * Weights in the layout the convolution chose. Convolutions created on plain HWIO weights
     * fall back to oneDNN's im2col + gemm; with the weights' format left to oneDNN (`any`) it
     * picks its direct JIT kernels (blocked weights, e.g. OIhw16i16o) on the same NHWC
     * activations, about 3x faster here. The weights are small, so reordering them on each call
     * costs little.
     */
    interface WeightsReorder {
      readonly primitive: Deno.PointerValue;
      readonly args: BigUint64Array;
      /** The plain HWIO side of the reorder: its data handle is the caller's pointer. */
      readonly plain: Deno.PointerValue;
      /** Kept alive: the blocked copy's storage (oneDNN holds a raw pointer to it). */
      readonly storage: Uint8Array;
    }

    interface Plan {
      readonly primitive: Deno.PointerValue;
      readonly args: BigUint64Array;
      /** Memory objects whose handles are the caller's x, w (when no reorder) and y. */
      readonly x: Deno.PointerValue;
      readonly w: Deno.PointerValue | undefined;
      readonly y: Deno.PointerValue;
      /** Before the convolution (forward, backward data) or after it (backward weights). */
      readonly reorder: WeightsReorder | undefined;
    }
    const forwardPds = new Map<string, Deno.PointerValue>();
    const plans = new Map<string, Plan | null>();

    const build = (
      direction: DnnlDirection,
      g: DnnlConvShape,
      key: string,
      weightsLayout: KernelSettings["dnnlWeightsLayout"],
    ): Plan => {
      const src = memoryDesc([g.n, g.ci, g.h, g.w], [g.h * g.w * g.ci, 1, g.w * g.ci, g.ci]);
      const wts = memoryDesc([g.co, g.ci, g.kh, g.kw], [1, g.co, g.kw * g.ci * g.co, g.ci * g.co]);
      let anyWts = wts;
      if (weightsLayout === "any") {
        anyWts = new Uint8Array(MEMORY_DESC_BYTES);
        ok(
          d.dnnl_memory_desc_init_by_tag(
            ptr(anyWts),
            4,
            ptr(dims([g.co, g.ci, g.kh, g.kw])),
            DNNL_F32,
            DNNL_FORMAT_TAG_ANY,
          ),
          "dnnl_memory_desc_init_by_tag",
        );
      }
      const dst = memoryDesc([g.n, g.co, g.oh, g.ow], [g.oh * g.ow * g.co, 1, g.ow * g.co, g.co]);
      const strides = dims([g.sh, g.sw]);
      const dilates = dims([g.dh - 1, g.dw - 1]);
      const padL = dims([g.top, g.left]);
      const padR = dims([g.bottom, g.right]);
      let forwardPd = forwardPds.get(key);
      if (forwardPd === undefined) {
        const desc = new Uint8Array(OP_DESC_BYTES);
        ok(
          d.dnnl_dilated_convolution_forward_desc_init(
            ptr(desc),
            DNNL_FORWARD_TRAINING,
            DNNL_CONVOLUTION_DIRECT,
            ptr(src),
            ptr(anyWts),
            null,
            ptr(dst),
            ptr(strides),
            ptr(dilates),
            ptr(padL),
            ptr(padR),
          ),
          "dnnl convolution forward desc",
        );
        forwardPd = primitiveDesc(desc, null);
        forwardPds.set(key, forwardPd);
      }
      let pd = forwardPd;
      if (direction === "backwardData") {
        const desc = new Uint8Array(OP_DESC_BYTES);
        ok(
          d.dnnl_dilated_convolution_backward_data_desc_init(
            ptr(desc),
            DNNL_CONVOLUTION_DIRECT,
            ptr(src),
            ptr(anyWts),
            ptr(dst),
            ptr(strides),
            ptr(dilates),
            ptr(padL),
            ptr(padR),
          ),
          "dnnl convolution backward data desc",
        );
        pd = primitiveDesc(desc, forwardPd);
      } else if (direction === "backwardWeights") {
        const desc = new Uint8Array(OP_DESC_BYTES);
        ok(
          d.dnnl_dilated_convolution_backward_weights_desc_init(
            ptr(desc),
            DNNL_CONVOLUTION_DIRECT,
            ptr(src),
            ptr(anyWts),
            null,
            ptr(dst),
            ptr(strides),
            ptr(dilates),
            ptr(padL),
            ptr(padR),
          ),
          "dnnl convolution backward weights desc",
        );
        pd = primitiveDesc(desc, forwardPd);
      }
      const weightsOut = direction === "backwardWeights";
      const chosen = d.dnnl_primitive_desc_query_md(
        pd,
        weightsOut ? QUERY_DIFF_WEIGHTS_MD : QUERY_WEIGHTS_MD,
        0,
      );
      kernelInvariant(chosen !== null, () => "dnnl: no weights memory desc");
      const x = memory(src);
      const y = memory(dst);
      let w: Deno.PointerValue | undefined;
      let reorder: WeightsReorder | undefined;
      let convWeights: Deno.PointerValue;
      if (d.dnnl_memory_desc_equal(chosen, ptr(wts)) !== 0) {
        w = memory(wts);
        convWeights = w;
      } else {
        const storage = new Uint8Array(Number(d.dnnl_memory_desc_get_size(chosen)));
        const s = slot();
        ok(d.dnnl_memory_create(ptr(s), chosen, engine, ptr(storage)), "dnnl_memory_create");
        convWeights = handle(s);
        const plain = memory(wts);
        const [from, to] = weightsOut ? [chosen, ptr(wts)] : [ptr(wts), chosen];
        const rs = slot();
        ok(
          d.dnnl_reorder_primitive_desc_create(ptr(rs), from, engine, to, engine, null),
          "dnnl reorder desc",
        );
        const [fromMemory, toMemory] = weightsOut ? [convWeights, plain] : [plain, convWeights];
        reorder = {
          primitive: primitive(handle(rs)),
          args: execArgs([[ARG_FROM, fromMemory], [ARG_TO, toMemory]]),
          plain,
          storage,
        };
      }
      const args = direction === "forward"
        ? execArgs([[ARG_SRC, x], [ARG_WEIGHTS, convWeights], [ARG_DST, y]])
        : direction === "backwardData"
        ? execArgs([[ARG_DIFF_SRC, x], [ARG_WEIGHTS, convWeights], [ARG_DIFF_DST, y]])
        : execArgs([[ARG_SRC, x], [ARG_DIFF_WEIGHTS, convWeights], [ARG_DIFF_DST, y]]);
      return { primitive: primitive(pd), args, x, w, y, reorder };
    };

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
        `${shape.epsilon},${shape.relu}`;
      let plan = bnPlans.get(key);
      if (plan !== undefined) return plan;
      // NHWC (oneDNN's nspc: its JIT kernels), [rows, C] as N = rows, H = W = 1.
      const { channels: c, height: h, width: w } = shape;
      const n = shape.rows / (h * w);
      const data = memoryDesc([n, c, h, w], [h * w * c, 1, w * c, c]);
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

    dnnlLoaded = {
      library: name,
      batchNorm,
      run: (direction, g, x, w, y) => {
        const shapeKey = [g.n, g.h, g.w, g.ci, g.oh, g.ow, g.co, g.kh, g.kw, g.sh, g.sw, g.dh, g.dw]
          .concat([g.top, g.left, g.bottom, g.right]).join(",");
        const weightsLayout = activeKernelSettings().dnnlWeightsLayout;
        // A primitive books its scratchpad for the threads at its creation: one per thread count.
        const key = `${direction}:${activeThreads()}:${weightsLayout}:${shapeKey}`;
        let plan = plans.get(key);
        if (plan === undefined) {
          try {
            plan = overrunsScratchpad(direction, g)
              ? null
              : build(direction, g, `${activeThreads()}:${weightsLayout}:${shapeKey}`, weightsLayout);
          } catch {
            plan = null; // a shape oneDNN does not take: the caller falls back, every time
          }
          plans.set(key, plan);
        }
        if (plan === null) return false;
        const execute = (p: Deno.PointerValue, args: BigUint64Array) =>
          ok(d.dnnl_primitive_execute(p, stream, args.length / 2, ptr(args)), "dnnl_primitive_execute");
        d.dnnl_memory_set_data_handle(plan.x, x);
        d.dnnl_memory_set_data_handle(plan.y, y);
        const reorder = plan.reorder;
        if (reorder === undefined) d.dnnl_memory_set_data_handle(plan.w!, w);
        else d.dnnl_memory_set_data_handle(reorder.plain, w);
        if (reorder !== undefined && direction !== "backwardWeights") {
          execute(reorder.primitive, reorder.args);
        }
        execute(plan.primitive, plan.args);
        if (reorder !== undefined && direction === "backwardWeights") {
          execute(reorder.primitive, reorder.args);
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
