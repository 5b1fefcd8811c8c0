/**
 * A run folder has one owner. `lockRunFolder` takes an exclusive OS lock
 * (flock) on `<folder>/.lock` before anything else is written, records who
 * holds it, and releases it when its scope closes. The OS drops the lock when
 * the process dies, so a crash never leaves the folder locked; a second run
 * into the same folder fails at once with a line naming the holder.
 *
 * Temp files carry the owner's tag (pid and a random suffix), so two processes
 * can never rename each other's half-written files, and the owner cleans only
 * temp files that cannot belong to a live writer: its own, and, since it holds
 * the lock, those a crashed earlier owner left behind.
 */
import { Effect, Schema, type Scope } from "effect";
import { readRegularText } from "../data/bounded_read.ts";

/** Another process holds the run folder. */
export class RunFolderBusy extends Schema.TaggedError<RunFolderBusy>()("RunFolderBusy", {
  folder: Schema.String,
  holder: Schema.String,
}) {
  /** The folder, who holds it, and what to do. */
  override get message(): string {
    return `run folder ${this.folder} is in use by ${this.holder}: wait for that run to end, stop it, ` +
      `or choose another --out`;
  }
}

/** The run folder cannot be created or written. */
export class RunFolderUnusable extends Schema.TaggedError<RunFolderUnusable>()("RunFolderUnusable", {
  folder: Schema.String,
  reason: Schema.String,
}) {
  /** The folder, why it cannot be used, and what to do. */
  override get message(): string {
    return `cannot use run folder ${this.folder}: ${this.reason}; choose another --out`;
  }
}

/** Who holds a lock, as written into the lock file. */
export interface LockHolder {
  readonly pid: number;
  readonly hostname: string;
  readonly started: string;
}

/** The owner's handle on its run folder. */
export interface RunFolder {
  readonly path: string;
  /** A temp file name for `target` (a path inside the folder) unique to this owner. */
  readonly tempPathFor: (target: string) => string;
  /** Removes this owner's leftover temp files, and those of dead earlier owners. */
  readonly cleanTempFiles: Effect.Effect<void, RunFolderUnusable>;
}

export const LOCK_FILE = ".lock";
const TEMP_SUFFIX = ".tmp";

const reasonOf = (cause: unknown): string => cause instanceof Error ? cause.message : String(cause);

/** The holder a lock file's text names, in words. */
export const describeHolder = (text: string): string => {
  try {
    const holder = JSON.parse(text) as Partial<LockHolder>;
    if (typeof holder.pid === "number") {
      return `process ${holder.pid}` + (holder.hostname ? ` on ${holder.hostname}` : "") +
        (holder.started ? ` (started ${holder.started})` : "");
    }
  } catch {
    // An older or foreign lock file: say only that someone holds it.
  }
  return "another process";
};

const hostname = (): string => {
  try {
    return Deno.hostname();
  } catch {
    return "";
  }
};

/**
 * Creates `folder` if needed and takes its lock for the enclosing scope.
 * Fails with `RunFolderBusy` (naming the holder) when another process has it.
 */
export const lockRunFolder = (
  folder: string,
): Effect.Effect<RunFolder, RunFolderBusy | RunFolderUnusable, Scope.Scope> =>
  Effect.gen(function* () {
    const unusable = (cause: unknown) => new RunFolderUnusable({ folder, reason: reasonOf(cause) });
    yield* Effect.tryPromise({ try: () => Deno.mkdir(folder, { recursive: true }), catch: unusable });
    const lockPath = `${folder}/${LOCK_FILE}`;
    const file = yield* Effect.acquireRelease(
      Effect.tryPromise({
        try: () => Deno.open(lockPath, { read: true, write: true, create: true }),
        catch: unusable,
      }),
      (file) => Effect.sync(() => file.close()),
    );
    const acquired = yield* Effect.tryPromise({ try: () => file.tryLock(true), catch: unusable });
    if (!acquired) {
      const text = yield* Effect.tryPromise({ try: () => Deno.readTextFile(lockPath), catch: unusable }).pipe(
        Effect.orElseSucceed(() => ""),
      );
      return yield* new RunFolderBusy({ folder, holder: describeHolder(text) });
    }
    yield* Effect.addFinalizer(() => Effect.promise(() => file.unlock().catch(() => {})));
    const holder: LockHolder = { pid: Deno.pid, hostname: hostname(), started: new Date().toISOString() };
    yield* Effect.tryPromise({
      try: async () => {
        await file.truncate(0);
        await file.write(new TextEncoder().encode(JSON.stringify(holder) + "\n"));
      },
      catch: unusable,
    });
    const tag = `${Deno.pid}-${crypto.randomUUID().slice(0, 8)}`;
    const tempPathFor = (target: string) => `${target}.${tag}${TEMP_SUFFIX}`;
    // Holding the lock, every temp file here is ours or a dead owner's: none can be in use.
    const cleanTempFiles = Effect.tryPromise({
      try: async () => {
        for await (const entry of Deno.readDir(folder)) {
          if (entry.isFile && entry.name.endsWith(TEMP_SUFFIX)) {
            await Deno.remove(`${folder}/${entry.name}`).catch(() => {});
          }
        }
      },
      catch: unusable,
    });
    yield* cleanTempFiles;
    return { path: folder, tempPathFor, cleanTempFiles };
  });

const write = (folder: RunFolder, what: () => Promise<void>) =>
  Effect.tryPromise({
    try: what,
    catch: (cause) => new RunFolderUnusable({ folder: folder.path, reason: reasonOf(cause) }),
  });

/** Writes `text` to `name` in the folder atomically: the owner's temp file, then a rename over the target. */
export const writeTextAtomic = (
  folder: RunFolder,
  name: string,
  text: string,
): Effect.Effect<void, RunFolderUnusable> =>
  write(folder, async () => {
    const target = `${folder.path}/${name}`;
    const temp = folder.tempPathFor(target);
    try {
      await Deno.writeTextFile(temp, text);
      await Deno.rename(temp, target);
    } catch (error) {
      await Deno.remove(temp).catch(() => {});
      throw error;
    }
  });

/** `value` as pretty JSON in `name`, atomically. */
export const writeJsonFile = (folder: RunFolder, name: string, value: unknown) =>
  writeTextAtomic(folder, name, JSON.stringify(value, null, 2) + "\n");

/** `rows` as JSON lines in `name`, atomically (the whole list each time). */
export const writeJsonLines = (folder: RunFolder, name: string, rows: readonly unknown[]) =>
  writeTextAtomic(folder, name, rows.map((row) => JSON.stringify(row) + "\n").join(""));

/** The lines of a JSON-lines text that parse and have `step` at most `lastStep` (torn lines dropped). */
export const linesUpToStep = (text: string, lastStep: number): string[] =>
  text.split("\n").filter((line) => {
    try {
      const step = (JSON.parse(line) as { step?: unknown }).step;
      return typeof step === "number" && step <= lastStep;
    } catch {
      return false;
    }
  });

/** The largest metrics.jsonl a resumed run reads back (about 2 million steps of metrics). */
export const METRICS_LOG_CAP = 512 * 2 ** 20;

/**
 * `metrics.jsonl` open for appending, one JSON line per call; the scope closes
 * it. With `resumeAt` (the step a resumed run continues from), lines of steps
 * past it (written after the checkpoint the run resumes from) are dropped
 * first, atomically, so each step appears once.
 */
export const openMetricsLog = (
  folder: RunFolder,
  resumeAt: number | undefined,
): Effect.Effect<(row: unknown) => Effect.Effect<void, RunFolderUnusable>, RunFolderUnusable, Scope.Scope> =>
  Effect.gen(function* () {
    const path = `${folder.path}/metrics.jsonl`;
    if (resumeAt !== undefined) {
      const exists = yield* Effect.promise(() => Deno.lstat(path).then(() => true, () => false));
      const text = exists
        ? yield* readRegularText(path, METRICS_LOG_CAP).pipe(
          Effect.mapError((error) => new RunFolderUnusable({ folder: folder.path, reason: error.message })),
        )
        : undefined;
      if (text !== undefined) {
        const kept = linesUpToStep(text, resumeAt);
        yield* writeTextAtomic(folder, "metrics.jsonl", kept.map((line) => line + "\n").join(""));
      }
    }
    const file = yield* Effect.acquireRelease(
      Effect.tryPromise({
        try: () => Deno.open(path, { append: true, create: true, write: true }),
        catch: (cause) => new RunFolderUnusable({ folder: folder.path, reason: reasonOf(cause) }),
      }),
      (file) => Effect.sync(() => file.close()),
    );
    const encoder = new TextEncoder();
    return (row: unknown) =>
      write(folder, async () => {
        await file.write(encoder.encode(JSON.stringify(row) + "\n"));
      });
  });
