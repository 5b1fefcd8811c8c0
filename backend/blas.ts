/**
 * OpenBLAS through `Deno.dlopen`, for the wasm backend's heavy kernels.
 *
 * tfjs-backend-wasm runs single-threaded under Deno (no SharedArrayBuffer
 * threads), while OpenBLAS's sgemm runs ~90 GFLOP/s per core on its own
 * pthreads. Operands are zero-copy views of the wasm heap: a tensor's bytes
 * live at `dataIdMap.get(dataId).memoryOffset` in the wasm memory, and
 * `Deno.UnsafePointer.of` of a view there is a native pointer OpenBLAS reads
 * and writes directly. The wasm memory can grow (and detach old views) on any
 * allocation, so pointers are taken from the current buffer right before each
 * call, after every output has been allocated.
 *
 * The library is found by its soname through the dynamic loader's cache (the
 * same lookup `ldconfig -p` lists; Debian: libopenblas0-pthread), or at the
 * path in `SWAV_BLAS_LIB`. Absent or disabled (`SWAV_BLAS=0`), `loadBlas`
 * returns undefined and the wasm kernels keep their plain paths.
 */

/** CBLAS enums. */
export const CblasRowMajor = 101;
export const CblasNoTrans = 111;
export const CblasTrans = 112;

const symbols = {
  cblas_sgemm: {
    parameters: [
      "i32", // order
      "i32", // transA
      "i32", // transB
      "i32", // M
      "i32", // N
      "i32", // K
      "f32", // alpha
      "pointer", // A
      "i32", // lda
      "pointer", // B
      "i32", // ldb
      "f32", // beta
      "pointer", // C
      "i32", // ldc
    ],
    result: "void",
  },
  openblas_set_num_threads: { parameters: ["i32"], result: "void" },
  openblas_get_num_threads: { parameters: [], result: "i32" },
} as const;

/** Library names tried in order (sonames resolve through ld.so.cache, as `ldconfig -p` shows them). */
const candidates = (): string[] => {
  let env: string | undefined;
  try {
    env = Deno.env.get("SWAV_BLAS_LIB");
  } catch {
    env = undefined; // no --allow-env
  }
  return [
    ...(env ? [env] : []),
    "libopenblas.so.0",
    "libopenblas.so",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/local/lib/libopenblas.so",
    "libopenblas.dylib",
    "/opt/homebrew/opt/openblas/lib/libopenblas.dylib",
  ];
};

/** A loaded BLAS. */
export interface Blas {
  /** The file or soname that loaded. */
  readonly library: string;
  readonly threads: number;
  /**
   * Row-major C[M, N] = alpha · op(A) · op(B) + beta · C, on raw pointers.
   * A is [M, K] (or [K, M] when transA), B is [K, N] (or [N, K] when transB).
   */
  sgemm(
    transA: boolean,
    transB: boolean,
    m: number,
    n: number,
    k: number,
    alpha: number,
    a: Deno.PointerValue,
    lda: number,
    b: Deno.PointerValue,
    ldb: number,
    beta: number,
    c: Deno.PointerValue,
    ldc: number,
  ): void;
  setThreads(threads: number): void;
}

interface BlasSettings {
  threads: number;
  enabled: boolean;
}

const settings: BlasSettings = {
  threads: 0,
  enabled: true,
};

let loaded: Blas | undefined;
let tried = false;
let failure: string | undefined;

/** The thread count asked for: `SWAV_THREADS`, else the machine's core count. */
export const defaultThreads = (): number => {
  let env: string | undefined;
  try {
    env = Deno.env.get("SWAV_THREADS");
  } catch {
    env = undefined; // no --allow-env
  }
  const n = Number(env);
  if (env !== undefined && env !== "" && Number.isInteger(n) && n >= 1) return n;
  return Math.max(1, navigator.hardwareConcurrency ?? 1);
};

/**
 * Sets BLAS use before (or after) the backend starts: `threads` for OpenBLAS's
 * pool (default `SWAV_THREADS` or the core count), `enabled: false` to keep
 * the plain wasm kernels. Takes effect on a loaded library at once.
 */
export const configureBlas = (options: { threads?: number; enabled?: boolean }): void => {
  if (options.threads !== undefined) {
    if (!Number.isInteger(options.threads) || options.threads < 1) {
      throw new RangeError(`configureBlas: threads must be an integer >= 1, got ${options.threads}`);
    }
    settings.threads = options.threads;
    loaded?.setThreads(options.threads);
    setOmpThreads?.(options.threads);
  }
  if (options.enabled !== undefined) settings.enabled = options.enabled;
};

/** Whether BLAS kernels should run now (loaded and enabled). */
export const blasEnabled = (): boolean => settings.enabled && loadBlas() !== undefined;

/**
 * Loads OpenBLAS once; undefined when it is not installed, FFI is not allowed,
 * or `SWAV_BLAS=0`. Never throws.
 */
export const loadBlas = (): Blas | undefined => {
  if (tried) return loaded;
  tried = true;
  let envOff = false;
  try {
    envOff = Deno.env.get("SWAV_BLAS") === "0";
  } catch {
    envOff = false;
  }
  if (envOff) {
    failure = "SWAV_BLAS=0";
    return undefined;
  }
  const errors: string[] = [];
  for (const name of candidates()) {
    try {
      const lib = Deno.dlopen(name, symbols);
      const sgemm = lib.symbols.cblas_sgemm;
      const blas: Blas = {
        library: name,
        get threads() {
          return lib.symbols.openblas_get_num_threads();
        },
        sgemm: (transA, transB, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc) =>
          sgemm(
            CblasRowMajor,
            transA ? CblasTrans : CblasNoTrans,
            transB ? CblasTrans : CblasNoTrans,
            m,
            n,
            k,
            alpha,
            a,
            lda,
            b,
            ldb,
            beta,
            c,
            ldc,
          ),
        setThreads: (threads) => lib.symbols.openblas_set_num_threads(threads),
      };
      blas.setThreads(settings.threads > 0 ? settings.threads : defaultThreads());
      loaded = blas;
      return blas;
    } catch (error) {
      errors.push(`${name}: ${error instanceof Error ? error.message.split("\n")[0] : String(error)}`);
    }
  }
  failure = errors.join("; ");
  return undefined;
};

/** What is in use, for benchmark headers and logs. */
export const blasInfo = (): { active: boolean; library?: string; threads?: number; reason?: string } => {
  const blas = loadBlas();
  if (blas === undefined) return { active: false, reason: failure ?? "not loaded" };
  if (!settings.enabled) return { active: false, library: blas.library, reason: "disabled" };
  return { active: true, library: blas.library, threads: blas.threads };
};

/** A native pointer to byte `offset` of `buffer` (zero-copy; valid while the buffer is not detached). */
export const pointerAt = (buffer: ArrayBufferLike, byteOffset: number): Deno.PointerValue =>
  Deno.UnsafePointer.of(new Uint8Array(buffer as ArrayBuffer, byteOffset));

/** Scratch float32 memory outside the wasm heap, grown on demand and reused between calls. */
export class Scratch {
  #data = new Float32Array(0);
  /** A view of at least `size` floats (contents undefined). */
  get(size: number): Float32Array {
    if (this.#data.length < size) {
      this.#data = new Float32Array(Math.max(size, Math.ceil(this.#data.length * 1.5)));
    }
    return this.#data.subarray(0, size);
  }
  /** Frees the memory. */
  release(): void {
    this.#data = new Float32Array(0);
  }
}

// ---------------------------------------------------------------------------
// oneDNN (Debian libdnnl2, v2.x C API) convolutions on NHWC / HWIO memory.
//
// Memory descriptors are given by strides (no format-tag enums, whose values
// change between versions): logical NCHW dims with NHWC strides, logical OIHW
// weights with HWIO strides. A primitive per (direction, geometry) is created
// once and cached; each call only points its memory objects at the tensors.
// ---------------------------------------------------------------------------

const dnnlSymbols = {
  dnnl_engine_create: { parameters: ["pointer", "i32", "usize"], result: "i32" },
  dnnl_stream_create: { parameters: ["pointer", "pointer", "u32"], result: "i32" },
  dnnl_memory_desc_init_by_strides: {
    parameters: ["pointer", "i32", "pointer", "i32", "pointer"],
    result: "i32",
  },
  dnnl_dilated_convolution_forward_desc_init: {
    parameters: [
      "pointer",
      "i32",
      "i32",
      "pointer",
      "pointer",
      "pointer",
      "pointer",
      "pointer",
      "pointer",
      "pointer",
      "pointer",
    ],
    result: "i32",
  },
  dnnl_dilated_convolution_backward_data_desc_init: {
    parameters: [
      "pointer",
      "i32",
      "pointer",
      "pointer",
      "pointer",
      "pointer",
      "pointer",
      "pointer",
      "pointer",
    ],
    result: "i32",
  },
  dnnl_dilated_convolution_backward_weights_desc_init: {
    parameters: [
      "pointer",
      "i32",
      "pointer",
      "pointer",
      "pointer",
      "pointer",
      "pointer",
      "pointer",
      "pointer",
      "pointer",
    ],
    result: "i32",
  },
  dnnl_primitive_desc_create: {
    parameters: ["pointer", "pointer", "pointer", "pointer", "pointer"],
    result: "i32",
  },
  dnnl_primitive_create: { parameters: ["pointer", "pointer"], result: "i32" },
  dnnl_memory_create: { parameters: ["pointer", "pointer", "pointer", "pointer"], result: "i32" },
  dnnl_memory_set_data_handle: { parameters: ["pointer", "pointer"], result: "i32" },
  dnnl_primitive_execute: { parameters: ["pointer", "pointer", "i32", "pointer"], result: "i32" },
  dnnl_stream_wait: { parameters: ["pointer"], result: "i32" },
} as const;

/** dnnl enums (stable across v1/v2). */
const DNNL_CPU = 1;
const DNNL_STREAM_DEFAULT = 1;
const DNNL_F32 = 3;
const DNNL_FORWARD_TRAINING = 64;
const DNNL_CONVOLUTION_DIRECT = 1;
const ARG_SRC = 1;
const ARG_DST = 17;
const ARG_WEIGHTS = 33;
const ARG_DIFF_SRC = 129;
const ARG_DIFF_DST = 145;
const ARG_DIFF_WEIGHTS = 161;
/** Generous sizes for the opaque descriptor structs (v2.6: memory desc ~1 KB, op desc a few KB). */
const MEMORY_DESC_BYTES = 4096;
const OP_DESC_BYTES = 16384;

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
}

let dnnlLoaded: Dnnl | undefined;
let dnnlTried = false;
let dnnlFailure: string | undefined;
let setOmpThreads: ((threads: number) => void) | undefined;

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
      setOmpThreads(settings.threads > 0 ? settings.threads : defaultThreads());
    } catch {
      setOmpThreads = undefined; // another threading runtime: OMP_NUM_THREADS / its default
    }
    const ok = (status: number, what: string) => {
      if (status !== 0) throw new Error(`${what} failed with dnnl status ${status}`);
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

    interface Plan {
      readonly primitive: Deno.PointerValue;
      /** Memory objects in the order of `args`, and the exec-arg array pointing at them. */
      readonly memories: Deno.PointerValue[];
      readonly args: BigUint64Array;
    }
    const forwardPds = new Map<string, Deno.PointerValue>();
    const plans = new Map<string, Plan | null>();

    const build = (direction: DnnlDirection, g: DnnlConvShape, key: string): Plan => {
      const src = memoryDesc([g.n, g.ci, g.h, g.w], [g.h * g.w * g.ci, 1, g.w * g.ci, g.ci]);
      const wts = memoryDesc([g.co, g.ci, g.kh, g.kw], [1, g.co, g.kw * g.ci * g.co, g.ci * g.co]);
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
            ptr(wts),
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
      let argIds: number[];
      let mds: Uint8Array[];
      if (direction === "forward") {
        argIds = [ARG_SRC, ARG_WEIGHTS, ARG_DST];
        mds = [src, wts, dst];
      } else if (direction === "backwardData") {
        const desc = new Uint8Array(OP_DESC_BYTES);
        ok(
          d.dnnl_dilated_convolution_backward_data_desc_init(
            ptr(desc),
            DNNL_CONVOLUTION_DIRECT,
            ptr(src),
            ptr(wts),
            ptr(dst),
            ptr(strides),
            ptr(dilates),
            ptr(padL),
            ptr(padR),
          ),
          "dnnl convolution backward data desc",
        );
        pd = primitiveDesc(desc, forwardPd);
        argIds = [ARG_DIFF_SRC, ARG_WEIGHTS, ARG_DIFF_DST];
        mds = [src, wts, dst];
      } else {
        const desc = new Uint8Array(OP_DESC_BYTES);
        ok(
          d.dnnl_dilated_convolution_backward_weights_desc_init(
            ptr(desc),
            DNNL_CONVOLUTION_DIRECT,
            ptr(src),
            ptr(wts),
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
        argIds = [ARG_SRC, ARG_DIFF_WEIGHTS, ARG_DIFF_DST];
        mds = [src, wts, dst];
      }
      const memories = mds.map(memory);
      // dnnl_exec_arg_t = { int arg; dnnl_memory_t memory } = 16 bytes with padding.
      const args = new BigUint64Array(2 * argIds.length);
      const ints = new Int32Array(args.buffer);
      argIds.forEach((id, i) => {
        ints[i * 4] = id;
        args[i * 2 + 1] = BigInt(Deno.UnsafePointer.value(memories[i]!));
      });
      return { primitive: primitive(pd), memories, args };
    };

    dnnlLoaded = {
      library: name,
      run: (direction, g, x, w, y) => {
        const shapeKey = [
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
          g
            .bottom,
          g.right,
        ].join(",");
        const key = `${direction}:${shapeKey}`;
        let plan = plans.get(key);
        if (plan === undefined) {
          try {
            plan = build(direction, g, shapeKey);
          } catch {
            plan = null; // a shape oneDNN does not take: the caller falls back, every time
          }
          plans.set(key, plan);
        }
        if (plan === null) return false;
        d.dnnl_memory_set_data_handle(plan.memories[0]!, x);
        d.dnnl_memory_set_data_handle(plan.memories[1]!, w);
        d.dnnl_memory_set_data_handle(plan.memories[2]!, y);
        ok(d.dnnl_primitive_execute(plan.primitive, stream, 3, ptr(plan.args)), "dnnl_primitive_execute");
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
  if (!settings.enabled) return { active: false, library: dnnl.library, reason: "disabled" };
  return { active: true, library: dnnl.library };
};
