/**
 * A run folder keeps its history: `pretrain --out DIR` into a folder that
 * already holds a run (a `config.json`, `metrics.jsonl`, `epochs.jsonl` or a
 * checkpoint) continues it only with `--resume`; without it the command stops
 * in one line naming the run and the ways on, before anything in the folder
 * changes. `--force` moves the earlier run aside into `DIR/previous-N` (the
 * first N free, so repeated runs keep every earlier one) and never deletes.
 *
 * The check runs once the folder is locked (pipelines/run_folder.ts), so two
 * runs cannot both find it empty; the move waits until the new run's start-up
 * checks passed (data, model, resume), so a run that fails at start leaves the
 * earlier run where it was.
 */
import { Effect, Schema } from "effect";
import { describeHolder, LOCK_FILE, type RunFolder, RunFolderBusy, RunFolderUnusable } from "./run_folder.ts";

/** The folder holds a run, and neither --resume nor --force was given. */
export class RunFolderHoldsRun extends Schema.TaggedError<RunFolderHoldsRun>()("RunFolderHoldsRun", {
  folder: Schema.String,
  what: Schema.String,
}) {
  /** The folder, what it holds, and the three ways on. */
  override get message(): string {
    return `run folder ${this.folder} already holds a run (${this.what}): continue it with --resume, ` +
      `start a new one with another --out, or add --force to move it aside into ${this.folder}/previous-N`;
  }
}

/** --resume continues a run, --force starts a new one: not both. */
export class ResumeWithForce extends Schema.TaggedError<ResumeWithForce>()("ResumeWithForce", {}) {
  /** Why the two options clash, and to give one of them. */
  override get message(): string {
    return "--resume continues the run in --out and --force moves it aside to start a new one: give one of them";
  }
}

/** Entries a run writes at the top of its folder, and the earlier runs moved aside. */
const PREVIOUS = /^previous-(\d+)$/;
const RUN_RECORDS = ["config.json", "metrics.jsonl", "epochs.jsonl"];
const CHECKPOINT = /^checkpoint-\d+\.swav$/;

/** What marks `names` (a folder's entries) as a run, in words; undefined when nothing does. */
export const runMarks = (names: readonly string[]): string | undefined => {
  const records = RUN_RECORDS.filter((name) => names.includes(name));
  const checkpoints = names.filter((name) => CHECKPOINT.test(name)).sort();
  const parts = [
    ...records,
    ...(checkpoints.length === 0 ? [] : [
      checkpoints.length === 1
        ? checkpoints[0]!
        : `${checkpoints.length} checkpoints up to ${checkpoints.at(-1)}`,
    ]),
  ];
  return parts.length === 0 ? undefined : parts.join(", ");
};

const entriesOf = (folder: RunFolder) =>
  Effect.tryPromise({
    try: async () => {
      const names: string[] = [];
      for await (const entry of Deno.readDir(folder.path)) names.push(entry.name);
      return names;
    },
    catch: (cause) =>
      new RunFolderUnusable({
        folder: folder.path,
        reason: cause instanceof Error ? cause.message : String(cause),
      }),
  });

/** What a fresh run must do with an earlier run in its folder. */
export interface EarlierRun {
  /** Moves the earlier run into `previous-N`; the new path, or undefined when there was none. */
  readonly moveAside: Effect.Effect<string | undefined, RunFolderUnusable>;
}

/**
 * Checks the locked `folder` for an earlier run. With `resume` anything goes
 * (the run continues); otherwise an earlier run is refused, unless `force`,
 * which returns the move to make once the new run's start-up checks passed.
 */
export const checkEarlierRun = (
  folder: RunFolder,
  options: { readonly resume?: boolean | undefined; readonly force?: boolean | undefined },
): Effect.Effect<EarlierRun, RunFolderHoldsRun | ResumeWithForce | RunFolderUnusable> =>
  Effect.gen(function* () {
    if (options.resume && options.force) return yield* new ResumeWithForce();
    const none: EarlierRun = { moveAside: Effect.succeed(undefined) };
    if (options.resume) return none;
    const what = runMarks(yield* entriesOf(folder));
    if (what === undefined) return none;
    if (!options.force) return yield* new RunFolderHoldsRun({ folder: folder.path, what });
    return { moveAside: moveEarlierRun(folder) };
  });

/**
 * Moves every entry of the folder but its lock, the owner's temp files and the
 * earlier `previous-N` folders into the first free `previous-N`. Renames within
 * one folder: nothing is copied, nothing deleted.
 */
export const moveEarlierRun = (folder: RunFolder): Effect.Effect<string, RunFolderUnusable> =>
  Effect.gen(function* () {
    const names = yield* entriesOf(folder);
    const taken = names.map((name) => PREVIOUS.exec(name)).filter((m) => m !== null).map((m) => Number(m[1]));
    const target = `${folder.path}/previous-${taken.length === 0 ? 1 : Math.max(...taken) + 1}`;
    const moved = names.filter((name) =>
      name !== LOCK_FILE && !PREVIOUS.test(name) && !name.endsWith(".tmp")
    );
    yield* Effect.tryPromise({
      try: async () => {
        await Deno.mkdir(target);
        for (const name of moved) await Deno.rename(`${folder.path}/${name}`, `${target}/${name}`);
      },
      catch: (cause) =>
        new RunFolderUnusable({
          folder: folder.path,
          reason: `moving the earlier run into ${target} failed (${
            cause instanceof Error ? cause.message : String(cause)
          }); what was moved is there, the rest is in place`,
        }),
    });
    return target;
  });

/** Who holds the folder's lock now (tried without waiting, released at once), or undefined. */
const lockHolder = async (folder: string): Promise<string | undefined> => {
  let file: Deno.FsFile;
  try {
    file = await Deno.open(`${folder}/${LOCK_FILE}`, { read: true, write: true });
  } catch {
    return undefined; // no lock file: no run has held it
  }
  try {
    if (await file.tryLock(true)) {
      await file.unlock();
      return undefined;
    }
    return describeHolder(await Deno.readTextFile(`${folder}/${LOCK_FILE}`).catch(() => ""));
  } catch {
    return undefined; // the lock itself reports its problem when the run takes it
  } finally {
    file.close();
  }
};

/**
 * The same check without holding the lock, in the process that starts the run
 * (and launches `--procs N` ranks): a folder in use or holding an earlier run is
 * refused before any rank starts (rank 0 checks again under the lock). A
 * folder that does not exist yet holds no run.
 */
export const precheckEarlierRun = (
  folder: string,
  options: { readonly resume?: boolean | undefined; readonly force?: boolean | undefined },
): Effect.Effect<void, RunFolderHoldsRun | ResumeWithForce | RunFolderBusy> =>
  Effect.gen(function* () {
    if (options.resume && options.force) return yield* new ResumeWithForce();
    // A folder in use says so first, as the lock would.
    const holder = yield* Effect.promise(() => lockHolder(folder));
    if (holder !== undefined) return yield* new RunFolderBusy({ folder, holder });
    if (options.resume || options.force) return;
    const names = yield* Effect.sync(() => {
      try {
        return [...Deno.readDirSync(folder)].map((entry) => entry.name);
      } catch {
        return [];
      }
    });
    const what = runMarks(names);
    if (what !== undefined) return yield* new RunFolderHoldsRun({ folder, what });
  });
