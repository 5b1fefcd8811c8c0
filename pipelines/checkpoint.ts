/**
 * Checkpoints and resume: everything needed to resume a run exactly, in one
 * file. The byte format is in `checkpoint_format.ts`; writing, reading and
 * pruning the files of a run folder (atomic writes, falling back to the newest
 * checkpoint that verifies) in `checkpoint_files.ts`.
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
import { type Checkpoint, CheckpointError, type ReadOptions, readWarning } from "./checkpoint_format.ts";

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
export {
  checkpointFileName,
  type FoundCheckpoint,
  latestCheckpoint,
  pruneCheckpoints,
  readCheckpoint,
  readCheckpointAt,
  readNewestValidCheckpoint,
  resolveCheckpointPath,
  writeCheckpoint,
} from "./checkpoint_files.ts";
import {
  pruneCheckpoints,
  readCheckpoint,
  readNewestValidCheckpoint,
  writeCheckpoint,
} from "./checkpoint_files.ts";

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
