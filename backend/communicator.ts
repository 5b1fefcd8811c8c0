/**
 * The `Communicator` service: this process's place among the ranks of a
 * data-parallel job and the collectives between them. MPI backs it when the
 * process was started by `mpiexec` (`backend/mpi.ts`); otherwise it is a world
 * of one whose collectives do nothing, so every single-process command runs
 * unchanged.
 *
 * Collectives are synchronous and in place on the array given (a view on the
 * wasm heap is reduced where the tensor lives; webgpu tensors are reduced from
 * host copies by the caller). Pipelines read the communicator from their
 * Effect context (`currentCommunicator`: the service, or a world of one where
 * none is provided). Batch norm and Sinkhorn run inside TF.js kernels
 * (stages/sinkhorn.ts, backend/sinkhorn_host.ts, backend/sync_batch_norm.ts,
 * backend/batch_norm_kernels.ts), called by TF.js with no Effect context of
 * ours, so they read the snapshot the Layer installs (`activeCommunicator()`),
 * as kernels read `activeKernelSettings()`.
 */
import { Context, Effect, Layer, Option, Schema } from "effect";
import { launchedByMpi, mpiLibraryPath, openMpi, type ReduceOp } from "./mpi.ts";

export type { ReduceOp } from "./mpi.ts";

/** The processes of a job and the collectives between them: a world of one, or MPI ranks in a data-parallel run. */
export interface Communicator {
  /** `mpi` when several processes share the job, `single` otherwise. */
  readonly kind: "single" | "mpi";
  /** This process's index, 0 .. size - 1. */
  readonly rank: number;
  /** Number of processes in the job. */
  readonly size: number;
  /** The MPI library's own version line (empty for `single`). */
  readonly library: string;
  /** Reduces `data` in place over all ranks (`mean` divides the sum by `size`). */
  readonly allReduce: (data: Float32Array | Float64Array, op: ReduceOp) => void;
  /** Copies `root`'s `data` into every rank's `data`. */
  readonly broadcast: (data: Float32Array | Float64Array | Uint8Array, root: number) => void;
  /** `root` gets every rank's `data` (equal lengths), rank-major; the other ranks get undefined. */
  readonly gather: (data: Float32Array, root: number) => Float32Array | undefined;
  /** Waits until every rank has reached it. */
  readonly barrier: () => void;
  /** Ends every rank of the job with `code` (the caller prints why first). */
  readonly abort: (code: number) => void;
}

/** A world of one: the collectives are identities. */
export const singleProcess: Communicator = {
  kind: "single",
  rank: 0,
  size: 1,
  library: "",
  allReduce: () => {},
  broadcast: () => {},
  gather: (data) => Float32Array.from(data),
  barrier: () => {},
  abort: (code) => Deno.exit(code),
};

let active: Communicator = singleProcess;

/**
 * The communicator the Layer installed (a world of one when none is): for kernels, which TF.js calls
 * with no Effect context; pipelines read `currentCommunicator` from theirs.
 */
export const activeCommunicator = (): Communicator => active;

/** MPI could not be opened or initialised; `reason` says why. */
export class CommunicatorUnavailable
  extends Schema.TaggedError<CommunicatorUnavailable>()("CommunicatorUnavailable", {
    library: Schema.String,
    reason: Schema.String,
  }) {
  override get message(): string {
    return `MPI is unavailable (${this.library}): ${this.reason}; install Debian's 'mpich' package ` +
      `(apt-get install mpich) or set SWAV_MPI_LIB to an MPICH-compatible libmpi`;
  }
}

const messageOf = (error: unknown): string =>
  error instanceof Error ? error.message.split("\n")[0]! : String(error);

const install = (communicator: Communicator) =>
  Effect.acquireRelease(
    Effect.sync(() => {
      const previous = active;
      active = communicator;
      return previous;
    }),
    (previous) =>
      Effect.sync(() => {
        active = previous;
      }),
  ).pipe(Effect.as(communicator));

/** Opens MPI once per process: `MPI_Init` may not run twice, so later Layers share the world. */
let world: Communicator | undefined;
const openWorld = (library: string): Effect.Effect<Communicator, CommunicatorUnavailable> =>
  world !== undefined ? Effect.succeed(world) : Effect.try({
    try: () => {
      const mpi = openMpi(library);
      // MPI_Finalize at exit, not on the Layer's release: MPI cannot be initialised again.
      globalThis.addEventListener("unload", () => mpi.finalize());
      world = {
        kind: "mpi",
        rank: mpi.rank,
        size: mpi.size,
        library: mpi.version,
        allReduce: mpi.allReduce,
        broadcast: mpi.broadcast,
        gather: mpi.gather,
        barrier: mpi.barrier,
        abort: mpi.abort,
      };
      return world;
    },
    catch: (error) => new CommunicatorUnavailable({ library, reason: messageOf(error) }),
  });

export class CommunicatorService extends Context.Service<CommunicatorService, Communicator>()(
  "swav-ts/backend/Communicator",
) {
  /** A world of one. */
  static readonly single: Layer.Layer<CommunicatorService> = Layer.effect(
    CommunicatorService,
    install(singleProcess),
  );

  /** MPI through `library` (`SWAV_MPI_LIB`, else Debian MPICH's). */
  static readonly mpi = (
    library: string = mpiLibraryPath(),
  ): Layer.Layer<CommunicatorService, CommunicatorUnavailable> =>
    Layer.effect(CommunicatorService, Effect.flatMap(openWorld(library), install));

  /** MPI when `mpiexec` started this process with more than one rank, a world of one otherwise. */
  static readonly auto: Layer.Layer<CommunicatorService, CommunicatorUnavailable> = Layer.unwrap(
    Effect.sync(() => launchedByMpi() ? CommunicatorService.mpi() : CommunicatorService.single),
  );
}

/**
 * The job's communicator as pipelines read it, from their Effect context: the one `CommunicatorService`
 * provides, or a world of one where none is (a library call, a test), so a pipeline needs no Layer to run
 * in one process.
 */
export const currentCommunicator: Effect.Effect<Communicator> = Effect.map(
  Effect.serviceOption(CommunicatorService),
  Option.getOrElse(() => singleProcess),
);
