/**
 * What a rank script under `mpiexec` shares: the MPI communicator installed
 * for the script's body, a seeded generator every rank draws the same values
 * from, and one JSON line of checks per rank on stdout for the Deno test that
 * started `mpiexec` (test/distributed_math_test.ts).
 */
import { Effect } from "effect";
import { type Communicator, CommunicatorService } from "../../backend/communicator.ts";
import { relativeError } from "../_helpers.ts";

/** One comparison: `error` (norm-wise relative, unless said) must stay under `tolerance`. */
export interface Check {
  readonly label: string;
  readonly error: number;
  readonly tolerance: number;
}

/** A check that `error` ≥ `least`: an expected difference, reported as error = least / error. */
export const differs = (label: string, difference: number, least: number): Check => ({
  label: `${label} (differs by ${difference.toExponential(2)}, at least ${least})`,
  error: difference > 0 ? least / difference : Infinity,
  tolerance: 1,
});

export const close = (
  label: string,
  got: ArrayLike<number>,
  ref: ArrayLike<number>,
  tolerance: number,
): Check => ({
  label,
  error: relativeError(got, ref),
  tolerance,
});

/** mulberry32: the same stream on every rank for the same seed. */
export const seededRandom = (seed: number): () => number => {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
};

export const testSeed = (): number => Number(Deno.env.get("SWAV_TEST_SEED") ?? "1");

/**
 * Runs `body` with MPI's communicator installed, prints
 * `{"rank", "size", "checks"}` as one line, and exits 1 when a check failed. An
 * exception aborts every rank (none is left waiting in a collective).
 */
export const runRank = async (body: (world: Communicator) => Promise<readonly Check[]>): Promise<void> => {
  const program = Effect.gen(function* () {
    const world = yield* CommunicatorService;
    return yield* Effect.tryPromise({
      try: async () => ({ world, checks: await body(world) }),
      catch: (error) => {
        console.error(`rank ${world.rank}: ${error instanceof Error ? error.stack : String(error)}`);
        world.abort(2);
        return error;
      },
    });
  }).pipe(Effect.provide(CommunicatorService.mpi()));
  const { world, checks } = await Effect.runPromise(program);
  console.log(JSON.stringify({ rank: world.rank, size: world.size, checks }));
  world.barrier();
  Deno.exit(checks.every((c) => c.error < c.tolerance) ? 0 : 1);
};
