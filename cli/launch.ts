/**
 * `--procs N`: a command re-runs itself as N MPI processes. `mpiexec` must start
 * the real Deno binary (`Deno.execPath()`): npm's `node_modules/.bin/deno`
 * wrapper breaks `MPI_Init` (`PMI_Get_appnum returned -1`). Each rank gets the
 * same arguments and this process's permissions, and `SWAV_THREADS` =
 * max(1, floor(cores / N)) unless `SWAV_THREADS` or `--threads` says otherwise.
 * Inside the ranks `mpiexec`'s environment (`PMI_SIZE`) makes
 * `CommunicatorService.auto` open MPI.
 *
 * A rank that fails prints one line naming itself and the cause, then aborts
 * the whole job (`MPI_Abort`): no rank is left waiting in a collective.
 */
import { Cause, Effect } from "effect";
import { type Communicator, CommunicatorUnavailable } from "../backend/communicator.ts";
import { launchedByMpi, mpiLibraryPath } from "../backend/mpi.ts";
import { failureLine } from "./report.ts";

export interface LaunchOptions {
  readonly procs: number;
  readonly hostfile?: string | undefined;
  readonly threads?: number | undefined;
  /** The run folder the job writes (its checkpoints decide what a failure line says). */
  readonly runFolder?: string | undefined;
  /** The script and its arguments, as the ranks run them. */
  readonly script: string;
  readonly args: readonly string[];
}

/** Threads per rank: `SWAV_THREADS` or `--threads` when given, else the cores shared out evenly. */
export const threadsPerRank = (procs: number, cores: number, given?: number): number =>
  given ?? Math.max(1, Math.floor(cores / procs));

const envThreads = (): string | undefined => {
  try {
    return Deno.env.get("SWAV_THREADS") || undefined;
  } catch {
    return undefined;
  }
};

/** The permission flags this process holds, for the ranks (never more than the caller has). */
const grantedPermissions = (): string[] => {
  const names = ["read", "write", "env", "ffi", "sys", "net", "run"] as const;
  return names.filter((name) => Deno.permissions.querySync({ name }).state === "granted")
    .map((name) => `--allow-${name}`);
};

/** True when this process should start `mpiexec` rather than train: more than one process asked, not a rank. */
export const shouldLaunch = (procs: number | undefined): boolean =>
  procs !== undefined && procs > 1 && !launchedByMpi();

/** MPICH is there: its library opens and `mpiexec` runs; otherwise the one-line error naming the package. */
const checkMpich = (): Effect.Effect<void, CommunicatorUnavailable> =>
  Effect.try({
    try: () => Deno.dlopen(mpiLibraryPath(), {}).close(),
    catch: (error) =>
      new CommunicatorUnavailable({
        library: mpiLibraryPath(),
        reason: error instanceof Error ? error.message.split("\n")[0]! : String(error),
      }),
  });

/** Runs the command as `procs` MPI processes and returns their exit code (mpiexec's). */
export const launchUnderMpi = (options: LaunchOptions): Effect.Effect<number, CommunicatorUnavailable> =>
  Effect.gen(function* () {
    yield* checkMpich();
    const cores = navigator.hardwareConcurrency ?? 1;
    const fromEnv = envThreads();
    const threads = fromEnv === undefined ? threadsPerRank(options.procs, cores, options.threads) : undefined;
    const args = [
      "-n",
      String(options.procs),
      ...(options.hostfile === undefined ? [] : ["-f", options.hostfile]),
      Deno.execPath(),
      "run",
      ...grantedPermissions(),
      options.script,
      ...options.args,
    ];
    const child = yield* Effect.try({
      try: () =>
        new Deno.Command("mpiexec", {
          args,
          env: threads === undefined ? {} : { SWAV_THREADS: String(threads) },
          stdin: "inherit",
          stdout: "inherit",
          stderr: "inherit",
        }).spawn(),
      catch: (error) =>
        new CommunicatorUnavailable({
          library: "mpiexec",
          reason: error instanceof Deno.errors.NotFound
            ? "mpiexec is not on PATH"
            : error instanceof Error
            ? error.message
            : String(error),
        }),
    });
    // Ctrl-C or a stop of the launcher reaches the ranks through mpiexec, once: a second Ctrl-C makes
    // mpiexec kill them at once, without their clean stop.
    let forwarded = false;
    const forward = (signal: Deno.Signal) => () => {
      if (forwarded) return;
      forwarded = true;
      try {
        child.kill(signal);
      } catch {
        // already ended
      }
    };
    const handlers = (["SIGINT", "SIGTERM"] as const).map((signal) => {
      const handler = forward(signal);
      Deno.addSignalListener(signal, handler);
      return [signal, handler] as const;
    });
    const status = yield* Effect.promise(() => child.status).pipe(
      // Under the CLI's runtime Ctrl-C interrupts this wait, and the process may exit before the listeners
      // above run: stop the job here and wait for it, so that no rank outlives the launcher.
      Effect.onInterrupt(() =>
        Effect.promise(async () => {
          forward("SIGINT")();
          const { code } = await child.status;
          Deno.exitCode = code === 0 ? INTERRUPTED_EXIT : code;
          // The ranks say so too, but their lines pass through mpiexec's proxies, which drop what they have
          // not forwarded when the job is aborted: this line is the one that always arrives.
          console.error(
            `interrupted: the job of ${options.procs} processes stopped; its last checkpoint stays usable: ` +
              "--resume continues",
          );
        })
      ),
      Effect.ensuring(Effect.sync(() => {
        for (const [signal, handler] of handlers) Deno.removeSignalListener(signal, handler);
      })),
    );
    if (status.code !== 0) {
      console.error(launchFailureLine({
        procs: options.procs,
        code: status.code,
        signal: status.signal,
        hostfile: options.hostfile,
        checkpoint: options.runFolder === undefined ? undefined : newestCheckpointName(options.runFolder),
      }));
    }
    return status.code;
  });

/** The newest `checkpoint-*.swav` name in `folder`, if any (names only: nothing is read). */
const newestCheckpointName = (folder: string): string | undefined => {
  try {
    return [...Deno.readDirSync(folder)].map((entry) => entry.name).filter((name) =>
      /^checkpoint-\d+\.swav$/.test(name)
    ).sort().at(-1);
  } catch {
    return undefined;
  }
};

/**
 * The launcher's line when mpiexec ends with a failure: what failed (mpiexec
 * itself, killed by a signal, or the job's processes), the host file when one
 * was given, and whether a checkpoint is there to resume from (a job that never
 * ran has none; the old wording promised one regardless).
 */
export const launchFailureLine = (failure: {
  readonly procs: number;
  readonly code: number;
  readonly signal: Deno.Signal | null;
  readonly hostfile: string | undefined;
  readonly checkpoint: string | undefined;
}): string => {
  const { procs, code, signal, hostfile, checkpoint } = failure;
  const what = signal !== null
    ? `mpiexec itself was killed by ${signal} (exit code ${code}) starting or running the job of ${procs} ` +
      "processes" + (hostfile === undefined ? "" : `; check the host file ${hostfile}`)
    // A rank killed from outside cannot say so itself: mpiexec's banner above names its PID and signal.
    : `the job of ${procs} processes stopped (mpiexec exit code ${code}; the lines above name the process ` +
      "and the cause" + (hostfile === undefined ? "" : `; host file ${hostfile}`) + ")";
  const resume = checkpoint === undefined
    ? "; the run folder holds no checkpoint to resume from"
    : `; the run folder's last checkpoint (${checkpoint}) stays usable: --resume continues`;
  return `error: ${what}${resume}`;
};

/** How long a failing rank waits between its error line and `MPI_Abort`. */
const ABORT_DRAIN = "1 second";

/** The exit code of a job stopped by Ctrl-C (128 + SIGINT), as a single process's. */
const INTERRUPTED_EXIT = 130;

/**
 * A rank's failure: one line naming the rank and the cause, then `MPI_Abort`
 * ends every rank of the job. A world of one reports as `reportFailure` does.
 * Ctrl-C (the launcher forwards it to every rank) ends the job the same way
 * once this rank's resources are released: a rank that is inside a collective
 * when the signal comes cannot see it until every rank joins, so without the
 * abort it would wait there for the interrupted ones forever.
 */
export const abortJobOnFailure = <A, E, R>(
  comm: Communicator,
  effect: Effect.Effect<A, E, R>,
): Effect.Effect<A, E, R> =>
  comm.size === 1 ? effect : effect.pipe(
    Effect.catchCause((cause) =>
      Cause.hasInterruptsOnly(cause) ? Effect.failCause(cause) : abortJob(
        comm,
        failureLine(cause).replace(/^error: /, `error: rank ${comm.rank} of ${comm.size}: `),
        1,
      )
    ),
    // An interruption cannot be caught, only followed: after this rank's scopes are released.
    Effect.onInterrupt(() =>
      abortJob(
        comm,
        `interrupted: rank ${comm.rank} of ${comm.size} stops the job; its last checkpoint stays usable: ` +
          "--resume continues",
        INTERRUPTED_EXIT,
      )
    ),
  );

/** One line on stderr, then `MPI_Abort`: mpiexec ends every rank. */
const abortJob = (comm: Communicator, line: string, code: number): Effect.Effect<never> =>
  Effect.uninterruptible(Effect.gen(function* () {
    console.error(line);
    // MPI_Abort makes mpiexec kill every process at once, and its proxy may drop output it has not
    // forwarded yet: the line above went missing so on a loaded machine. A moment lets it through.
    yield* Effect.sleep(ABORT_DRAIN);
    comm.abort(code);
    return yield* Effect.die(new Error(`MPI_Abort(${code}) returned`));
  }));
