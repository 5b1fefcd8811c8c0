/**
 * Checkpoints on disk and resume: everything needed to resume a run exactly,
 * in one file written atomically (temp file in the same folder, fsync,
 * rename), so a crash or a Ctrl-C mid-write leaves the previous checkpoint
 * intact and loadable. The byte format is in `checkpoint_format.ts`; reading a
 * run folder falls back to the newest checkpoint that verifies.
 */
import { Effect, Schema } from "effect";
import { loadModelArrays, type ModelWeightsError, readModelArrays, type SwavModel } from "../models/model.ts";
import type { LarcSgd } from "../stages/optimise.ts";
import {
  type EmbeddingQueue,
  type QueueError,
  restore as restoreQueue,
  serialise as serialiseQueue,
  type SerialisedQueue,
} from "../state/queue.ts";
import type { MemoryBank } from "../state/memory_bank.ts";
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

export {
  type Checkpoint,
  CheckpointError,
  checkpointFormatVersion,
  decodeCheckpoint,
  encodeCheckpoint,
  maxCheckpointBytes,
  type NamedArray,
  type ReadOptions,
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

/** A checkpoint whose arrays do not fit the model or the run (another architecture, a missing queue). */
export class CheckpointMismatch extends Schema.TaggedError<CheckpointMismatch>()("CheckpointMismatch", {
  path: Schema.String,
  message: Schema.String,
}) {}

/** Where a run stands: steps taken, the epoch to continue with and the batches of it already done. */
export interface RunPosition {
  readonly step: number;
  readonly epoch: number;
  readonly batchInEpoch: number;
}

/** The queue's settings as a checkpoint's `extra.queue` holds them. */
type SavedQueue = {
  length: number;
  batchSize: number;
  dim: number;
  cropsForAssign: number[];
  filled: number;
};

/** What a run checkpoints: its state with an owner, and what `extra` records. */
export interface RunState {
  readonly model: SwavModel;
  readonly optimiser: LarcSgd;
  readonly queue: EmbeddingQueue | undefined;
  /** The queue as saved, when given (every rank's, gathered), instead of this process's `queue`. */
  readonly savedQueue?: SerialisedQueue | undefined;
  readonly config: unknown;
  readonly seed: number;
  readonly backend: string;
  /** The training method's name (train.method), recorded for eval, extract and export. */
  readonly method?: string | undefined;
  /** DeepCluster-v2's memory bank and targets. */
  readonly memoryBank?: MemoryBank | undefined;
}

/** The memory bank's shape as a checkpoint's `extra.memoryBank` holds it. */
type SavedBank = { size: number; dim: number; crops: number; heads: number; filled: boolean };

/** The memory bank's arrays: `bank/{i}` [size, dim], `bank/present` and `targets/{h}` [size]. */
const bankArrays = (bank: MemoryBank) => [
  ...bank.banks.map((values, i) => ({ name: `bank/${i}`, shape: [bank.size, bank.dim], values })),
  { name: "bank/present", shape: [bank.size], values: Int32Array.from(bank.present) },
  ...bank.targets.map((values, h) => ({ name: `targets/${h}`, shape: [bank.size], values })),
];

/** A checkpoint of the run at `position`: weights, optimiser slots, queue, counters. */
export const assembleCheckpoint = (position: RunPosition, run: RunState): Effect.Effect<Checkpoint> =>
  Effect.gen(function* () {
    const slots = yield* Effect.promise(() => run.optimiser.serialise());
    const savedQueue = run.savedQueue ??
      (run.queue === undefined ? undefined : yield* serialiseQueue(run.queue));
    const arrays = [
      ...(yield* readModelArrays(run.model)),
      ...Object.entries(slots).map(([name, slot]) => ({
        name: `optimiser/${name}`,
        shape: [...slot.shape],
        values: slot.values,
      })),
      ...(savedQueue?.embeddings ?? []).map((values, i) => ({
        name: `queue/${i}`,
        shape: [savedQueue!.length, savedQueue!.dim],
        values,
      })),
      ...(run.memoryBank === undefined ? [] : bankArrays(run.memoryBank)),
    ];
    return {
      step: position.step,
      epoch: position.epoch,
      batchInEpoch: position.batchInEpoch,
      config: run.config,
      extra: {
        seed: run.seed,
        backend: run.backend,
        ...(run.method === undefined ? {} : { method: run.method }),
        ...(run.memoryBank === undefined ? {} : {
          memoryBank: {
            size: run.memoryBank.size,
            dim: run.memoryBank.dim,
            crops: run.memoryBank.banks.length,
            heads: run.memoryBank.targets.length,
            filled: run.memoryBank.filled,
          } satisfies SavedBank,
        }),
        ...(savedQueue === undefined ? {} : {
          queue: {
            length: savedQueue.length,
            batchSize: savedQueue.batchSize,
            dim: savedQueue.dim,
            cropsForAssign: savedQueue.cropsForAssign,
            filled: savedQueue.filled,
          },
        }),
      },
      arrays,
    };
  });

/** Writes the run's checkpoint at `position` atomically, then prunes old ones; the file's path. */
export const saveCheckpoint = (folder: string, keep: number, position: RunPosition, run: RunState) =>
  Effect.gen(function* () {
    const path = yield* writeCheckpoint(folder, yield* assembleCheckpoint(position, run));
    yield* pruneCheckpoints(folder, keep);
    return path;
  });

/**
 * Restores weights, optimiser slots and queue from the checkpoint at `path`;
 * `queueFor(epoch)` creates the queue for the epoch the run continues with.
 * When that file is damaged, the newest older checkpoint of its folder that
 * verifies is used instead, with a warning naming the damaged one. The
 * position to continue from, and the file it came from.
 */
export const restoreRun = <E, R, S = never>(
  path: string,
  run: {
    readonly model: SwavModel;
    readonly optimiser: LarcSgd;
    readonly queueStartEpoch: number;
    readonly queueFor: (epoch: number) => Effect.Effect<EmbeddingQueue | undefined, E, R>;
    readonly onWarning?: ((message: string) => void) | undefined;
    /** This process's part of the saved queue (data-parallel ranks); the whole queue without. */
    readonly queueShard?: (saved: SerialisedQueue) => Effect.Effect<SerialisedQueue, S>;
    /** DeepCluster-v2's memory bank, restored from the checkpoint's. */
    readonly memoryBank?: MemoryBank | undefined;
  },
): Effect.Effect<
  RunPosition & { readonly path: string },
  CheckpointError | CheckpointMismatch | ModelWeightsError | QueueError | E | S,
  R
> =>
  Effect.gen(function* () {
    const { path: file, checkpoint } = yield* readWithFallback(path, run);
    yield* loadModelArrays(run.model, checkpoint.arrays, `checkpoint ${file}`);
    const params = new Map(run.model.params.map((p) => [p.name, p.variable.shape.join("x")]));
    const slots = checkpoint.arrays.filter((a) => a.name.startsWith("optimiser/"));
    for (const slot of slots) {
      const name = slot.name.slice("optimiser/".length);
      const shape = params.get(name);
      if (shape !== slot.shape.join("x") || !(slot.values instanceof Float32Array)) {
        return yield* new CheckpointMismatch({
          path: file,
          message: `checkpoint ${file}: optimiser slot ${name} [${slot.shape}] ${
            shape === undefined
              ? "has no model parameter"
              : `does not fit the parameter [${shape.split("x")}]`
          }: a checkpoint of another model?`,
        });
      }
    }
    run.optimiser.restore(Object.fromEntries(
      slots.map((
        a,
      ) => [a.name.slice("optimiser/".length), { shape: a.shape, values: a.values as Float32Array }]),
    ));
    const savedQueue = checkpoint.extra["queue"] as SavedQueue | undefined;
    if (savedQueue !== undefined) {
      const queue = yield* run.queueFor(Math.max(checkpoint.epoch, run.queueStartEpoch));
      if (queue !== undefined) {
        const embeddings: Float32Array[] = [];
        for (let i = 0; i < savedQueue.cropsForAssign.length; i++) {
          const array = checkpoint.arrays.find((a) => a.name === `queue/${i}`);
          if (array === undefined || !(array.values instanceof Float32Array)) {
            return yield* new CheckpointMismatch({
              path: file,
              message: `checkpoint ${file} lacks queue/${i}`,
            });
          }
          embeddings.push(array.values);
        }
        const whole: SerialisedQueue = { ...savedQueue, embeddings };
        yield* restoreQueue(queue, run.queueShard === undefined ? whole : yield* run.queueShard(whole));
      }
    }
    if (run.memoryBank !== undefined) yield* restoreBank(run.memoryBank, checkpoint, file);
    return {
      step: checkpoint.step,
      epoch: checkpoint.epoch,
      batchInEpoch: checkpoint.batchInEpoch,
      path: file,
    };
  });

/** Copies the checkpoint's memory bank and targets into `bank`; they must have its shape. */
const restoreBank = (bank: MemoryBank, checkpoint: Checkpoint, file: string) =>
  Effect.gen(function* () {
    const saved = checkpoint.extra["memoryBank"] as SavedBank | undefined;
    const mismatch = (what: string) =>
      new CheckpointMismatch({
        path: file,
        message: `checkpoint ${file}: ${what}, the run's bank is ${bank.size} x ${bank.dim} for ` +
          `${bank.banks.length} crops and ${bank.targets.length} heads: resume with the config it was made with`,
      });
    if (saved === undefined) return yield* mismatch("no DeepCluster-v2 memory bank (another method's run?)");
    if (
      saved.size !== bank.size || saved.dim !== bank.dim || saved.crops !== bank.banks.length ||
      saved.heads !== bank.targets.length
    ) {
      return yield* mismatch(
        `a memory bank of ${saved.size} x ${saved.dim} for ${saved.crops} crops and ${saved.heads} heads`,
      );
    }
    const find = (name: string, size: number) => {
      const array = checkpoint.arrays.find((a) => a.name === name);
      return array !== undefined && array.values.length === size ? array.values : undefined;
    };
    for (
      const [name, target, size] of [
        ...bank.banks.map((b, i) => [`bank/${i}`, b, bank.size * bank.dim] as const),
        ["bank/present", bank.present, bank.size] as const,
        ...bank.targets.map((t, h) => [`targets/${h}`, t, bank.size] as const),
      ]
    ) {
      const values = find(name, size);
      if (values === undefined) return yield* mismatch(`${name} is missing or has the wrong size`);
      target.set(values);
    }
    bank.filled = saved.filled;
  });

/** Reads `path`; when it is damaged, the newest older checkpoint of its folder that verifies (warning). */
const readWithFallback = (path: string, options: ReadOptions) =>
  Effect.gen(function* () {
    const direct = yield* Effect.result(readCheckpoint(path, options));
    if (direct._tag === "Success") return { path, checkpoint: direct.success };
    const folder = path.includes("/") ? path.slice(0, path.lastIndexOf("/")) : ".";
    const older = yield* readNewestValidCheckpoint(folder, { ...options, before: path });
    if (older === undefined) {
      return yield* new CheckpointError({
        path,
        reason: `${direct.failure.reason}; no older checkpoint to fall back to: start again without --resume`,
      });
    }
    yield* readWarning(options, `${direct.failure.message}; resuming from the older ${older.path}`);
    return older;
  });
