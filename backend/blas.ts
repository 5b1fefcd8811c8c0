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
  // A file named by the user is the only one tried: a name that does not load must show as absent
  // (`deno task doctor`), not be replaced silently by the system's copy.
  if (env) return [env];
  return [
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
  dnnl_batch_normalization_forward_desc_init: {
    parameters: ["pointer", "i32", "pointer", "f32", "u32"],
    result: "i32",
  },
  dnnl_batch_normalization_backward_desc_init: {
    parameters: ["pointer", "i32", "pointer", "pointer", "f32", "u32"],
    result: "i32",
  },
  dnnl_memory_desc_init_by_tag: {
    parameters: ["pointer", "i32", "pointer", "i32", "i32"],
    result: "i32",
  },
  dnnl_primitive_desc_query_md: { parameters: ["pointer", "i32", "i32"], result: "pointer" },
  dnnl_memory_desc_equal: { parameters: ["pointer", "pointer"], result: "i32" },
  dnnl_memory_desc_get_size: { parameters: ["pointer"], result: "usize" },
  dnnl_reorder_primitive_desc_create: {
    parameters: ["pointer", "pointer", "pointer", "pointer", "pointer", "pointer"],
    result: "i32",
  },
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
const ARG_FROM = 1;
const ARG_TO = 17;
const DNNL_FORMAT_TAG_ANY = 1;
const QUERY_WEIGHTS_MD = 131;
const QUERY_EXEC_ARG_MD = 255;
const DNNL_BACKWARD = 128;
const DNNL_FUSE_NORM_RELU = 0x4;
const DNNL_USE_SCALE = 0x8;
const DNNL_USE_SHIFT = 0x10;
const ARG_MEAN = 49;
const ARG_VARIANCE = 50;
const ARG_SCALE = 51;
const ARG_SHIFT = 52;
const ARG_WORKSPACE = 64;
const ARG_DIFF_SCALE = 255;
const ARG_DIFF_SHIFT = 256;
const QUERY_DIFF_WEIGHTS_MD = 132;
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
  /** y = [relu](gamma (x − mean)/√(var + eps) + beta), with the batch mean and biased variance. */
  forward(shape: BatchNormShape, p: BatchNormForwardPointers): void;
  /** dx, dgamma, dbeta from dy (the gradient of y) and the forward's statistics. */
  backward(shape: BatchNormShape, p: BatchNormBackwardPointers): void;
}

/**
 * How oneDNN convolutions take their weights: `any` lets oneDNN choose their
 * layout (its direct JIT kernels, the weights reordered on each call), `plain`
 * passes TF.js's HWIO as is (oneDNN then runs im2col + gemm, ~3x slower here).
 * `plain` exists for before/after measurements (bench/step_variants.ts).
 */
export const dnnlOptions: { weightsLayout: "any" | "plain" } = { weightsLayout: "any" };

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

    const build = (direction: DnnlDirection, g: DnnlConvShape, key: string): Plan => {
      const src = memoryDesc([g.n, g.ci, g.h, g.w], [g.h * g.w * g.ci, 1, g.w * g.ci, g.ci]);
      const wts = memoryDesc([g.co, g.ci, g.kh, g.kw], [1, g.co, g.kw * g.ci * g.co, g.ci * g.co]);
      let anyWts = wts;
      if (dnnlOptions.weightsLayout === "any") {
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
      if (chosen === null) throw new Error("dnnl: no weights memory desc");
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
        if (md === null) throw new Error(`dnnl: no memory desc for argument ${id}`);
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

    const bnPlans = new Map<string, { forward: ArgPlan; backward: ArgPlan }>();
    const bnPlan = (shape: BatchNormShape) => {
      const key =
        `${shape.rows},${shape.height},${shape.width},${shape.channels},${shape.epsilon},${shape.relu}`;
      let plan = bnPlans.get(key);
      if (plan !== undefined) return plan;
      // NHWC (oneDNN's nspc: its JIT kernels), [rows, C] as N = rows, H = W = 1.
      const { channels: c, height: h, width: w } = shape;
      const n = shape.rows / (h * w);
      const data = memoryDesc([n, c, h, w], [h * w * c, 1, w * c, c]);
      const flags = DNNL_USE_SCALE | DNNL_USE_SHIFT | (shape.relu ? DNNL_FUSE_NORM_RELU : 0);
      const fdesc = new Uint8Array(OP_DESC_BYTES);
      ok(
        d.dnnl_batch_normalization_forward_desc_init(
          ptr(fdesc),
          DNNL_FORWARD_TRAINING,
          ptr(data),
          shape.epsilon,
          flags,
        ),
        "dnnl batch normalization forward desc",
      );
      const forwardPd = primitiveDesc(fdesc, null);
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
      const backwardPd = primitiveDesc(bdesc, forwardPd);
      const workspace = shape.relu ? [ARG_WORKSPACE] : [];
      plan = {
        forward: argPlan(forwardPd, [
          ARG_SRC,
          ARG_DST,
          ARG_MEAN,
          ARG_VARIANCE,
          ARG_SCALE,
          // oneDNN 2.6 counts the shift among the backward's inputs (it reads no value of it).
          ARG_SHIFT,
          ...workspace,
        ]),
        backward: argPlan(backwardPd, [
          ARG_SRC,
          ARG_MEAN,
          ARG_VARIANCE,
          ARG_DIFF_DST,
          ARG_SCALE,
          // oneDNN 2.6 counts the shift among the backward's inputs (it reads no value of it).
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
      forward: (shape, p) => {
        const pointers = new Map<number, Deno.PointerValue>([
          [ARG_SRC, p.x],
          [ARG_DST, p.y],
          [ARG_MEAN, p.mean],
          [ARG_VARIANCE, p.variance],
          [ARG_SCALE, p.gamma],
          [ARG_SHIFT, p.beta],
        ]);
        if (shape.relu) pointers.set(ARG_WORKSPACE, p.workspace!);
        runPlan(bnPlan(shape).forward, pointers);
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
        const key = `${direction}:${dnnlOptions.weightsLayout}:${shapeKey}`;
        let plan = plans.get(key);
        if (plan === undefined) {
          try {
            plan = build(direction, g, `${dnnlOptions.weightsLayout}:${shapeKey}`);
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
  if (!settings.enabled) return { active: false, library: dnnl.library, reason: "disabled" };
  return { active: true, library: dnnl.library };
};
