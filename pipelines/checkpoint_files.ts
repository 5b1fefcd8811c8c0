/**
 * Checkpoint files in a run folder: writing one atomically (temp file in the
 * same folder, fsync, rename, so a crash or a Ctrl-C mid-write leaves the
 * previous checkpoint intact), reading one, finding the newest that verifies,
 * and pruning old ones. What a checkpoint holds and how a run resumes from it
 * are in `checkpoint.ts`.
 */
import { Effect } from "effect";
import { readRegularFile } from "../data/bounded_read.ts";
import {
  type Checkpoint,
  CheckpointError,
  decodeCheckpoint,
  encodeCheckpoint,
  maxCheckpointBytes,
  type ReadOptions,
  readWarning,
} from "./checkpoint_format.ts";

/** The checkpoint file name for a step: zero-padded so names sort by step. */
export const checkpointFileName = (step: number): string =>
  `checkpoint-${String(step).padStart(9, "0")}.swav`;

/**
 * Writes atomically: the bytes go to a temp file beside the target, are flushed
 * to disk, then renamed over the target (rename is atomic within a folder).
 * `tempPathFor` names the temp file (the run folder's owner passes its own, so
 * no other writer can touch it). A checkpoint holding a non-finite value is
 * refused: resuming from it could only fail again.
 */
export const writeCheckpoint = (
  folder: string,
  checkpoint: Checkpoint,
  tempPathFor: (target: string) => string = (target) => `${target}.${crypto.randomUUID()}.tmp`,
): Effect.Effect<string, CheckpointError> =>
  Effect.gen(function* () {
    const bad = checkpoint.arrays.find((a) =>
      a.values instanceof Float32Array && !a.values.every(Number.isFinite)
    )
      ?.name;
    if (bad !== undefined) {
      return yield* new CheckpointError({
        path: `${folder}/${checkpointFileName(checkpoint.step)}`,
        reason: `not written: ${bad} holds a non-finite value`,
      });
    }
    return yield* Effect.tryPromise({
      try: async () => {
        await Deno.mkdir(folder, { recursive: true });
        const target = `${folder}/${checkpointFileName(checkpoint.step)}`;
        const temp = tempPathFor(target);
        try {
          const file = await Deno.open(temp, { write: true, create: true, truncate: true });
          try {
            const bytes = encodeCheckpoint(checkpoint);
            let written = 0;
            while (written < bytes.length) written += await file.write(bytes.subarray(written));
            await file.sync();
          } finally {
            file.close();
          }
          await Deno.rename(temp, target);
        } catch (error) {
          // A failed write (a full disk) leaves no temp file behind.
          await Deno.remove(temp).catch(() => undefined);
          throw error;
        }
        return target;
      },
      catch: (error) =>
        new CheckpointError({ path: folder, reason: error instanceof Error ? error.message : String(error) }),
    });
  }).pipe(
    // An interruption (Ctrl-C) waits for the write to finish: a checkpoint is either complete or absent,
    // and no temp file is left behind.
    Effect.uninterruptible,
  );

/**
 * Reads one checkpoint file: a regular file of at most `maxCheckpointBytes`
 * (checked before the buffer is allocated), then `decodeCheckpoint`.
 *
 * @example Read a run's checkpoint and load its weights into a fresh model
 * ```ts
 * import { Effect } from "effect";
 * import assert from "node:assert/strict";
 * import {
 *   decodeRunConfig,
 *   loadModelArrays,
 *   pretrain,
 *   readCheckpoint,
 *   scopedSwavModel,
 *   TensorBackend,
 *   writeDemoDataset,
 * } from "@swav/swav-ts";
 *
 * const data = await Deno.makeTempDir();
 * const out = await Deno.makeTempDir();
 * await writeDemoDataset({ folder: data, perClassTrain: 4, perClassTest: 2, size: 16, seed: 1 });
 * const step = await Effect.runPromise(Effect.scoped(Effect.gen(function* () {
 *   const config = yield* decodeRunConfig({
 *     data: { source: `${data}:train` },
 *     multicrop: { nmbCrops: [2, 2], sizeCrops: [16, 8], minScaleCrops: [0.3, 0.1], maxScaleCrops: [1, 0.3] },
 *     model: { arch: "resnet18", width: 4, stem: "cifar", hidden: 32, out: 16, prototypes: 20 },
 *     train: { epochs: 1, batchSize: 8, out, knnEvery: 0 },
 *   });
 *   const { checkpoint } = yield* pretrain(config);
 *   const saved = yield* readCheckpoint(checkpoint!); // verified: a damaged file fails with CheckpointError
 *   const model = yield* scopedSwavModel(config.model, 1);
 *   yield* loadModelArrays(model, saved.arrays, checkpoint!); // names and shapes checked
 *   return saved.step;
 * })).pipe(Effect.provide(TensorBackend.layer("wasm"))));
 * assert.equal(step, 5);
 * await Deno.remove(data, { recursive: true });
 * await Deno.remove(out, { recursive: true });
 * ```
 */
export const readCheckpoint = (
  path: string,
  options?: ReadOptions,
): Effect.Effect<Checkpoint, CheckpointError> =>
  readRegularFile(path, maxCheckpointBytes).pipe(
    Effect.mapError((error) => new CheckpointError({ path, reason: error.reason })),
    Effect.flatMap((bytes) => decodeCheckpoint(bytes, path, options)),
  );

const checkpointName = /^checkpoint-\d+\.swav$/;

/** The complete checkpoint files of a folder (temp files of an interrupted write are not), oldest first. */
const checkpointFiles = (folder: string): Effect.Effect<string[] | undefined, CheckpointError> =>
  Effect.tryPromise({
    try: async () => {
      const names: string[] = [];
      try {
        for await (const entry of Deno.readDir(folder)) {
          if (entry.isFile && checkpointName.test(entry.name)) names.push(entry.name);
        }
      } catch (error) {
        if (error instanceof Deno.errors.NotFound) return undefined;
        throw error;
      }
      return names.sort().map((name) => `${folder}/${name}`);
    },
    catch: (error) =>
      new CheckpointError({ path: folder, reason: error instanceof Error ? error.message : String(error) }),
  });

/**
 * The newest complete checkpoint in a run folder (temp files of an interrupted
 * write are ignored), or undefined when there is none. Its content is not read:
 * see `readNewestValidCheckpoint`.
 */
export const latestCheckpoint = (folder: string): Effect.Effect<string | undefined, CheckpointError> =>
  Effect.map(checkpointFiles(folder), (files) => files?.at(-1));

/** A checkpoint read from a run folder, and the newer ones that were damaged and skipped. */
export interface FoundCheckpoint {
  readonly path: string;
  readonly checkpoint: Checkpoint;
  readonly damaged: readonly CheckpointError[];
}

/**
 * The newest checkpoint of `folder` that reads and verifies (older than
 * `before` when given): a damaged one (truncated, bad header, checksum
 * mismatch) is skipped with a warning naming it. Undefined when the folder
 * holds no checkpoint; a CheckpointError naming each file when all are damaged.
 */
export const readNewestValidCheckpoint = (
  folder: string,
  options?: ReadOptions & { readonly before?: string | undefined },
): Effect.Effect<FoundCheckpoint | undefined, CheckpointError> =>
  Effect.gen(function* () {
    const all = (yield* checkpointFiles(folder)) ?? [];
    const before = options?.before;
    const files = before === undefined ? all : all.filter((file) => basename(file) < basename(before));
    const damaged: CheckpointError[] = [];
    for (const path of files.reverse()) {
      const result = yield* Effect.result(readCheckpoint(path, options));
      if (result._tag === "Success") {
        for (const error of damaged) {
          yield* readWarning(options, `${error.message}; using the older ${path} instead`);
        }
        return { path, checkpoint: result.success, damaged };
      }
      damaged.push(result.failure);
    }
    if (damaged.length === 0) return undefined;
    return yield* new CheckpointError({
      path: folder,
      reason: `every checkpoint is damaged (${
        damaged.map((error) => `${basename(error.path)}: ${error.reason}`).join("; ")
      }): restore a copy of the run folder, or start the run again`,
    });
  });

const basename = (path: string) => path.slice(path.lastIndexOf("/") + 1);

/**
 * Resolves PATH as given on a command line: a checkpoint file, or a run folder
 * (its latest checkpoint).
 */
export const resolveCheckpointPath = (path: string): Effect.Effect<string, CheckpointError> =>
  Effect.gen(function* () {
    const info = yield* Effect.tryPromise({
      try: () => Deno.stat(path),
      catch: () => new CheckpointError({ path, reason: "no such file or folder" }),
    });
    if (info.isFile) return path;
    const latest = yield* latestCheckpoint(path);
    if (latest === undefined) {
      return yield* new CheckpointError({ path, reason: "the folder holds no checkpoint-*.swav file" });
    }
    return latest;
  });

/**
 * Reads PATH as given on a command line: a checkpoint file (it must verify),
 * or a run folder (its newest checkpoint that verifies, with a warning naming
 * any newer damaged one).
 */
export const readCheckpointAt = (
  path: string,
  options?: ReadOptions,
): Effect.Effect<{ path: string; checkpoint: Checkpoint }, CheckpointError> =>
  Effect.gen(function* () {
    const info = yield* Effect.tryPromise({
      try: () => Deno.stat(path),
      catch: () => new CheckpointError({ path, reason: "no such file or folder" }),
    });
    if (!info.isDirectory) return { path, checkpoint: yield* readCheckpoint(path, options) };
    const found = yield* readNewestValidCheckpoint(path, options);
    if (found === undefined) {
      return yield* new CheckpointError({ path, reason: "the folder holds no checkpoint-*.swav file" });
    }
    return found;
  });

/**
 * Removes all but the newest `keep` checkpoints of a folder (old ones only cost
 * disk). Temp files are left alone: one may be another writer's, half-written;
 * the run folder's owner removes the stale ones when it takes the lock.
 */
export const pruneCheckpoints = (folder: string, keep: number): Effect.Effect<void, CheckpointError> =>
  Effect.tryPromise({
    try: async () => {
      const names: string[] = [];
      for await (const entry of Deno.readDir(folder)) {
        if (entry.isFile && /^checkpoint-\d+\.swav$/.test(entry.name)) names.push(entry.name);
      }
      names.sort();
      for (const name of names.slice(0, Math.max(0, names.length - keep))) {
        await Deno.remove(`${folder}/${name}`).catch(() => undefined);
      }
    },
    catch: (error) =>
      new CheckpointError({ path: folder, reason: error instanceof Error ? error.message : String(error) }),
  });
