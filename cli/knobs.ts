/**
 * The process knobs of `pretrain` (`--procs`, `--threads`, `--hostfile`),
 * checked in the launching process before any rank starts, so that a bad value
 * is one line instead of N ranks failing (or mpiexec crashing) one by one:
 * `--procs` must be >= 1 and split the batch; `--threads` must be >= 1 and is
 * capped at the cores with a warning (more threads than cores only wait for
 * each other; 100000 made libgomp/oneDNN crash); a host file must be a small
 * regular file of `host[:slots]` lines (MPICH's mpiexec dies of SIGFPE on
 * `host:0` and of SIGSEGV on `::::`).
 */
import { Effect, Schema } from "effect";
import { readRegularFile, type UnsafeFile } from "../pipelines/bounded_read.ts";
import { type DataParallelError, localBatchSize } from "../pipelines/data_parallel.ts";

/** A command-line value out of its range. */
export class InvalidFlag extends Schema.TaggedError<InvalidFlag>()("InvalidFlag", {
  flag: Schema.String,
  reason: Schema.String,
}) {
  override get message(): string {
    return `--${this.flag} ${this.reason}`;
  }
}

/** The threads used for `requested` on a machine of `cores`, and the warning when they are capped. */
export const cappedThreads = (requested: number, cores: number): { threads: number; warning?: string } =>
  requested > cores && cores > 0
    ? {
      threads: cores,
      warning: `threads: ${requested} requested, capped at ${cores} (the number of CPU cores; more threads ` +
        "only wait for each other)",
    }
    : { threads: requested };

/** The biggest host file read (a host file names hosts, one a line). */
const HOSTFILE_CAP = 1 << 20;
const HOST_LINE = /^[A-Za-z0-9_]([A-Za-z0-9_.-]*)(:[1-9][0-9]{0,5})?$/;

/** A host file for MPICH: a regular file whose lines are `host` or `host:slots` (slots >= 1), `#` comments. */
export const checkHostfile = (path: string): Effect.Effect<void, InvalidFlag | UnsafeFile> =>
  Effect.gen(function* () {
    const text = new TextDecoder().decode(yield* readRegularFile(path, HOSTFILE_CAP));
    const lines = text.split("\n").map((line) => line.replace(/#.*/, "").trim());
    const bad = lines.findIndex((line) => line !== "" && !HOST_LINE.test(line));
    if (bad >= 0) {
      const shown = JSON.stringify(lines[bad]!.slice(0, 60));
      return yield* new InvalidFlag({
        flag: "hostfile",
        reason: `${path}: line ${bad + 1} ${shown} is not host or host:slots (slots a whole number >= 1)`,
      });
    }
    if (lines.every((line) => line === "")) {
      return yield* new InvalidFlag({
        flag: "hostfile",
        reason: `${path} names no host (one host[:slots] a line)`,
      });
    }
  });

/** What the launching process runs with: the threads per process (capped) and the warning to show. */
export interface Knobs {
  readonly threads: number | undefined;
  readonly warning?: string;
}

/**
 * Checks `--procs`, `--threads` and `--hostfile` against each other and the
 * batch before anything starts; the threads to use.
 */
export const checkKnobs = (
  options: {
    readonly procs: number | undefined;
    readonly threads: number | undefined;
    readonly hostfile: string | undefined;
    readonly batchSize: number;
  },
  cores: number = navigator.hardwareConcurrency ?? 1,
): Effect.Effect<Knobs, InvalidFlag | UnsafeFile | DataParallelError> =>
  Effect.gen(function* () {
    const { procs, threads, hostfile, batchSize } = options;
    if (procs !== undefined && procs < 1) {
      return yield* new InvalidFlag({ flag: "procs", reason: `must be 1 or more processes, got ${procs}` });
    }
    if (threads !== undefined && threads < 1) {
      return yield* new InvalidFlag({ flag: "threads", reason: `must be 1 or more threads, got ${threads}` });
    }
    if (procs !== undefined) yield* localBatchSize(batchSize, procs);
    if (hostfile !== undefined) yield* checkHostfile(hostfile);
    return threads === undefined ? { threads } : cappedThreads(threads, cores);
  });
