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

/** Another process holds the run folder. */
export class RunFolderBusy extends Schema.TaggedError<RunFolderBusy>()("RunFolderBusy", {
  folder: Schema.String,
  holder: Schema.String,
}) {
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

const describeHolder = (text: string): string => {
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
