/**
 * MPI through `Deno.dlopen`: the few collectives data-parallel training needs,
 * on MPICH's ABI (Debian `mpich`, `libmpich.so.12`), whose handles are plain
 * integers from its `mpi.h`. `SWAV_MPI_LIB` names another library file with
 * the same ABI (Intel MPI, MVAPICH, a non-Debian MPICH); OpenMPI's ABI (handles
 * are pointers to globals) is not supported.
 *
 * Every call is synchronous and blocks until the collective completes on all
 * ranks: batch norm and Sinkhorn call it from inside TF.js kernels and gradient
 * functions, which cannot await. MPI's default error handler (errors are fatal)
 * stays installed, so a failed collective ends the whole job instead of leaving
 * ranks waiting.
 */
import { kernelInvariant } from "./invariant.ts";

/** Handles and constants from MPICH's `mpi.h`. */
export const MPI_COMM_WORLD = 0x44000000;
export const MPI_BYTE = 0x4c00010d;
export const MPI_FLOAT = 0x4c00040a;
export const MPI_DOUBLE = 0x4c00080b;
export const MPI_SUM = 0x58000003;
export const MPI_MAX = 0x58000001;
/** MPI_IN_PLACE is the address -1 in MPICH. */
const MPI_IN_PLACE = Deno.UnsafePointer.create(0xffffffffffffffffn);
/** Counts are C ints: larger buffers go in slices of this many elements. */
const MAX_COUNT = 1 << 30;

const mpiSymbols = {
  MPI_Initialized: { parameters: ["buffer"], result: "i32" },
  MPI_Init: { parameters: ["pointer", "pointer"], result: "i32" },
  MPI_Finalized: { parameters: ["buffer"], result: "i32" },
  MPI_Finalize: { parameters: [], result: "i32" },
  MPI_Comm_rank: { parameters: ["i32", "buffer"], result: "i32" },
  MPI_Comm_size: { parameters: ["i32", "buffer"], result: "i32" },
  MPI_Allreduce: {
    parameters: ["pointer", "buffer", "i32", "i32", "i32", "i32"],
    result: "i32",
  },
  MPI_Bcast: { parameters: ["buffer", "i32", "i32", "i32", "i32"], result: "i32" },
  MPI_Gather: {
    parameters: ["buffer", "i32", "i32", "buffer", "i32", "i32", "i32", "i32"],
    result: "i32",
  },
  MPI_Barrier: { parameters: ["i32"], result: "i32" },
  MPI_Abort: { parameters: ["i32", "i32"], result: "i32" },
  MPI_Get_library_version: { parameters: ["buffer", "buffer"], result: "i32" },
} as const satisfies Deno.ForeignLibraryInterface;

/** The library file: `SWAV_MPI_LIB`, else Debian MPICH's. */
export const mpiLibraryPath = (): string => {
  try {
    return Deno.env.get("SWAV_MPI_LIB") || "libmpich.so.12";
  } catch {
    return "libmpich.so.12";
  }
};

/** The launcher's environment says this process is one rank of several (MPICH hydra or PMIx). */
export const launchedByMpi = (): boolean => {
  try {
    const size = Deno.env.get("PMI_SIZE") ?? Deno.env.get("PMIX_SIZE") ?? Deno.env.get("MPI_LOCALNRANKS");
    return size !== undefined && Number(size) > 1;
  } catch {
    return false;
  }
};

/** How `allReduce` combines the ranks' values. */
export type ReduceOp = "sum" | "mean" | "max";

/** An initialised MPI world. */
export interface MpiWorld {
  readonly rank: number;
  readonly size: number;
  readonly version: string;
  allReduce(data: Float32Array | Float64Array, op: ReduceOp): void;
  broadcast(data: Float32Array | Float64Array | Uint8Array, root: number): void;
  gather(data: Float32Array, root: number): Float32Array | undefined;
  barrier(): void;
  abort(code: number): void;
  finalize(): void;
}

const typeOf = (data: Float32Array | Float64Array | Uint8Array): number =>
  data instanceof Float32Array ? MPI_FLOAT : data instanceof Float64Array ? MPI_DOUBLE : MPI_BYTE;

/**
 * Opens the library and initialises MPI (once per process). Throws when the
 * library is missing or `MPI_Init` fails; the caller turns that into a typed
 * error.
 */
export const openMpi = (path: string = mpiLibraryPath()): MpiWorld => {
  const lib = Deno.dlopen(path, mpiSymbols);
  const m = lib.symbols;
  const ok = (status: number, what: string) =>
    kernelInvariant(status === 0, () => `${what} failed with MPI error ${status}`);
  const flag = new Int32Array(1);
  ok(m.MPI_Initialized(flag), "MPI_Initialized");
  if (flag[0] === 0) ok(m.MPI_Init(null, null), "MPI_Init");
  const out = new Int32Array(1);
  ok(m.MPI_Comm_rank(MPI_COMM_WORLD, out), "MPI_Comm_rank");
  const rank = out[0]!;
  ok(m.MPI_Comm_size(MPI_COMM_WORLD, out), "MPI_Comm_size");
  const size = out[0]!;
  const text = new Uint8Array(8192);
  const length = new Int32Array(1);
  m.MPI_Get_library_version(text, length);
  const version = new TextDecoder().decode(text.subarray(0, length[0])).split("\n")[0]!.trim();
  let finalized = false;
  return {
    rank,
    size,
    version,
    allReduce(data, op) {
      const type = typeOf(data);
      const mpiOp = op === "max" ? MPI_MAX : MPI_SUM;
      for (let start = 0; start < data.length; start += MAX_COUNT) {
        const slice = data.subarray(start, Math.min(data.length, start + MAX_COUNT));
        ok(
          m.MPI_Allreduce(MPI_IN_PLACE, slice, slice.length, type, mpiOp, MPI_COMM_WORLD),
          "MPI_Allreduce",
        );
      }
      if (op === "mean") {
        for (let i = 0; i < data.length; i++) data[i] = data[i]! / size;
      }
    },
    broadcast(data, root) {
      const type = typeOf(data);
      for (let start = 0; start < data.length; start += MAX_COUNT) {
        const slice = data.subarray(start, Math.min(data.length, start + MAX_COUNT));
        ok(m.MPI_Bcast(slice, slice.length, type, root, MPI_COMM_WORLD), "MPI_Bcast");
      }
    },
    gather(data, root) {
      kernelInvariant(data.length < MAX_COUNT, () => `MPI_Gather: ${data.length} floats is too many`);
      const out = new Float32Array(rank === root ? data.length * size : 0);
      ok(
        m.MPI_Gather(data, data.length, MPI_FLOAT, out, data.length, MPI_FLOAT, root, MPI_COMM_WORLD),
        "MPI_Gather",
      );
      return rank === root ? out : undefined;
    },
    barrier() {
      ok(m.MPI_Barrier(MPI_COMM_WORLD), "MPI_Barrier");
    },
    abort(code) {
      m.MPI_Abort(MPI_COMM_WORLD, code);
    },
    finalize() {
      if (finalized) return;
      finalized = true;
      const done = new Int32Array(1);
      m.MPI_Finalized(done);
      if (done[0] === 0) m.MPI_Finalize();
    },
  };
};
