/**
 * Checkpoints: everything needed to resume a run exactly, in one file written
 * atomically (temp file in the same folder, fsync, rename), so a crash or a
 * Ctrl-C mid-write leaves the previous checkpoint intact and loadable.
 *
 * File format (version 1), little-endian:
 *
 *   bytes 0..7    magic "SWAVCKPT"
 *   bytes 8..11   uint32 format version (1)
 *   bytes 12..15  uint32 header length H
 *   bytes 16..    H bytes of UTF-8 JSON header:
 *                 { version, step, epoch, config, rng, extra, tensors: [{ name, shape, dtype, offset, length }] }
 *   then          the tensor payload: each tensor's float32 (or int32) values, 4-byte aligned,
 *                 at `offset` bytes from the payload start, `length` elements long.
 *
 * Tensor names: model variables by their model name (`backbone.layer1.0.conv1.weight`, ...),
 * optimiser slots as `optimiser/<variable name>`, queue as `queue/<crop index>`.
 */
import { Effect, Schema } from "effect";
import {
  loadModelArrays,
  ModelWeightsError,
  type NamedArray,
  readModelArrays,
  type SwavModel,
} from "../models/model.ts";
import type { LarcSgd } from "../stages/optimise.ts";
import {
  type EmbeddingQueue,
  type QueueError,
  restore as restoreQueue,
  serialise as serialiseQueue,
} from "../state/queue.ts";

export const checkpointFormatVersion = 1;
const magic = new TextEncoder().encode("SWAVCKPT");

export type { NamedArray } from "../models/model.ts";

/** The content of a checkpoint. */
export interface Checkpoint {
  /** Optimiser steps taken (the next step's index). */
  readonly step: number;
  /** The epoch to continue with, and how many batches of it are already done. */
  readonly epoch: number;
  readonly batchInEpoch: number;
  /** The resolved config of the run (JSON). */
  readonly config: unknown;
  /** Anything else small and JSON-able (RNG seed and counters, metrics so far). */
  readonly extra: Record<string, unknown>;
  readonly arrays: readonly NamedArray[];
}

export class CheckpointError extends Schema.TaggedError<CheckpointError>()("CheckpointError", {
  path: Schema.String,
  reason: Schema.String,
}) {
  override get message(): string {
    return `checkpoint ${this.path}: ${this.reason}`;
  }
}

interface HeaderEntry {
  name: string;
  shape: number[];
  dtype: "float32" | "int32";
  offset: number;
  length: number;
}

/** Serialises a checkpoint to bytes. */
export const encodeCheckpoint = (checkpoint: Checkpoint): Uint8Array => {
  let offset = 0;
  const entries: HeaderEntry[] = checkpoint.arrays.map((array) => {
    const entry: HeaderEntry = {
      name: array.name,
      shape: [...array.shape],
      dtype: array.values instanceof Int32Array ? "int32" : "float32",
      offset,
      length: array.values.length,
    };
    offset += array.values.length * 4;
    return entry;
  });
  const header = new TextEncoder().encode(JSON.stringify({
    version: checkpointFormatVersion,
    step: checkpoint.step,
    epoch: checkpoint.epoch,
    batchInEpoch: checkpoint.batchInEpoch,
    config: checkpoint.config,
    extra: checkpoint.extra,
    tensors: entries,
  }));
  // Pad the header so the payload starts 4-byte aligned (typed-array views need it).
  const headerLength = Math.ceil(header.length / 4) * 4;
  const payloadStart = 16 + headerLength;
  const bytes = new Uint8Array(payloadStart + offset);
  bytes.set(magic, 0);
  const view = new DataView(bytes.buffer);
  view.setUint32(8, checkpointFormatVersion, true);
  view.setUint32(12, headerLength, true);
  bytes.fill(0x20, 16, payloadStart); // spaces: valid trailing JSON whitespace
  bytes.set(header, 16);
  checkpoint.arrays.forEach((array, i) => {
    bytes.set(
      new Uint8Array(array.values.buffer, array.values.byteOffset, array.values.byteLength),
      payloadStart + entries[i]!.offset,
    );
  });
  return bytes;
};

/** Parses checkpoint bytes; `path` only names the file in errors. */
export const decodeCheckpoint = (bytes: Uint8Array, path: string): Checkpoint => {
  const fail = (reason: string): never => {
    // A synchronous decoder (also used outside Effect); readCheckpoint turns this into its error channel.
    throw new CheckpointError({ path, reason });
  };
  if (bytes.length < 16 || magic.some((b, i) => bytes[i] !== b)) fail("not a swav-ts checkpoint (bad magic)");
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const version = view.getUint32(8, true);
  if (version !== checkpointFormatVersion) {
    fail(`format version ${version} is not supported (this build reads version ${checkpointFormatVersion})`);
  }
  const headerLength = view.getUint32(12, true);
  if (16 + headerLength > bytes.length) fail("truncated header");
  let header: {
    step: number;
    epoch: number;
    batchInEpoch?: number;
    config: unknown;
    extra?: Record<string, unknown>;
    tensors: HeaderEntry[];
  };
  try {
    header = JSON.parse(new TextDecoder().decode(bytes.subarray(16, 16 + headerLength)));
  } catch (error) {
    return fail(`corrupt header: ${error instanceof Error ? error.message : String(error)}`);
  }
  const payloadStart = 16 + headerLength;
  const arrays = header.tensors.map((entry): NamedArray => {
    const start = payloadStart + entry.offset;
    const end = start + entry.length * 4;
    if (end > bytes.length) fail(`truncated payload for ${entry.name}`);
    // Copy out so the arrays own aligned buffers independent of the file bytes.
    const raw = bytes.slice(start, end);
    const values = entry.dtype === "int32" ? new Int32Array(raw.buffer) : new Float32Array(raw.buffer);
    return { name: entry.name, shape: entry.shape, values };
  });
  return {
    step: header.step,
    epoch: header.epoch,
    batchInEpoch: header.batchInEpoch ?? 0,
    config: header.config,
    extra: header.extra ?? {},
    arrays,
  };
};

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

/** Reads one checkpoint file. */
export const readCheckpoint = (path: string): Effect.Effect<Checkpoint, CheckpointError> =>
  Effect.tryPromise({
    try: async () => decodeCheckpoint(await Deno.readFile(path), path),
    catch: (error) =>
      error instanceof CheckpointError
        ? error
        : new CheckpointError({ path, reason: error instanceof Error ? error.message : String(error) }),
  });

/**
 * The newest complete checkpoint in a run folder (temp files of an interrupted
 * write are ignored), or undefined when there is none.
 */
export const latestCheckpoint = (folder: string): Effect.Effect<string | undefined, CheckpointError> =>
  Effect.tryPromise({
    try: async () => {
      const names: string[] = [];
      try {
        for await (const entry of Deno.readDir(folder)) {
          if (entry.isFile && /^checkpoint-\d+\.swav$/.test(entry.name)) names.push(entry.name);
        }
      } catch (error) {
        if (error instanceof Deno.errors.NotFound) return undefined;
        throw error;
      }
      names.sort();
      const newest = names.at(-1);
      return newest === undefined ? undefined : `${folder}/${newest}`;
    },
    catch: (error) =>
      new CheckpointError({ path: folder, reason: error instanceof Error ? error.message : String(error) }),
  });

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
  readonly config: unknown;
  readonly seed: number;
  readonly backend: string;
}

/** A checkpoint of the run at `position`: weights, optimiser slots, queue, counters. */
export const assembleCheckpoint = (position: RunPosition, run: RunState): Effect.Effect<Checkpoint> =>
  Effect.gen(function* () {
    const slots = yield* Effect.promise(() => run.optimiser.serialise());
    const savedQueue = run.queue === undefined ? undefined : yield* serialiseQueue(run.queue);
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
    ];
    return {
      step: position.step,
      epoch: position.epoch,
      batchInEpoch: position.batchInEpoch,
      config: run.config,
      extra: {
        seed: run.seed,
        backend: run.backend,
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
 * The position to continue from.
 */
export const restoreRun = <E, R>(
  path: string,
  run: {
    readonly model: SwavModel;
    readonly optimiser: LarcSgd;
    readonly queueStartEpoch: number;
    readonly queueFor: (epoch: number) => Effect.Effect<EmbeddingQueue | undefined, E, R>;
  },
): Effect.Effect<RunPosition, CheckpointError | CheckpointMismatch | ModelWeightsError | QueueError | E, R> =>
  Effect.gen(function* () {
    const checkpoint = yield* readCheckpoint(path);
    yield* loadModelArrays(run.model, checkpoint.arrays, `checkpoint ${path}`);
    run.optimiser.restore(Object.fromEntries(
      checkpoint.arrays.filter((a) => a.name.startsWith("optimiser/")).map((a) => [
        a.name.slice("optimiser/".length),
        { shape: a.shape, values: a.values as Float32Array },
      ]),
    ));
    const savedQueue = checkpoint.extra["queue"] as SavedQueue | undefined;
    if (savedQueue !== undefined) {
      const queue = yield* run.queueFor(Math.max(checkpoint.epoch, run.queueStartEpoch));
      if (queue !== undefined) {
        const embeddings: Float32Array[] = [];
        for (let i = 0; i < savedQueue.cropsForAssign.length; i++) {
          const array = checkpoint.arrays.find((a) => a.name === `queue/${i}`);
          if (array === undefined) {
            return yield* new CheckpointMismatch({ path, message: `checkpoint ${path} lacks queue/${i}` });
          }
          embeddings.push(array.values as Float32Array);
        }
        yield* restoreQueue(queue, { ...savedQueue, embeddings });
      }
    }
    return { step: checkpoint.step, epoch: checkpoint.epoch, batchInEpoch: checkpoint.batchInEpoch };
  });
