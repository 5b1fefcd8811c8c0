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
 * returns undefined and the wasm kernels keep their plain paths. Kernel
 * settings (backend/kernel_settings.ts) choose the threads and switch it off.
 */

import { activeKernelSettings, activeThreads } from "./kernel_settings.ts";

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

let loaded: Blas | undefined;
let tried = false;
let failure: string | undefined;

/** Sets the pool's thread count on a loaded library (the backend Layer calls it with the settings' threads). */
export const setBlasThreads = (threads: number): void => loaded?.setThreads(threads);

/** Whether BLAS kernels should run now (loaded, and on in the active kernel settings). */
export const blasEnabled = (): boolean => activeKernelSettings().blas && loadBlas() !== undefined;

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
      blas.setThreads(activeThreads());
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
  if (!activeKernelSettings().blas) return { active: false, library: blas.library, reason: "disabled" };
  return { active: true, library: blas.library, threads: blas.threads };
};

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
