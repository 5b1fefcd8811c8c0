/**
 * The embedding queue (for small batches): state with an owner.
 *
 * As in main_swav.py, one queue per assignment crop holds the detached
 * embeddings z [queueLength, D] of past batches. Its scores are recomputed with
 * the current prototypes before use; it is used only once full; each push
 * shifts the rows down by one batch (FIFO) and puts the new batch in front:
 *
 *     queue[i, bs:] = queue[i, :-bs].clone()
 *     queue[i, :bs] = embedding[crop_id * bs: (crop_id + 1) * bs]
 *
 * The tensors live in a `SynchronizedRef` (updates are serialised); `makeQueue`
 * ties their disposal to a scope, and `createQueue` gives a queue its caller
 * disposes (`using queue = Effect.runSync(createQueue(...))`). A push replaces the tensors and disposes the
 * old ones. Queue tensors are kept (`tf.keep`) so an enclosing `tf.tidy` cannot
 * free them, and are computed off any gradient tape.
 */
import * as tf from "@tensorflow/tfjs";
import { Effect, Schema, type Scope, SynchronizedRef } from "effect";
import { disposeAll } from "../backend/resources.ts";
import { prototypeScores } from "../models/prototypes.ts";
import { withoutGradient } from "../backend/no_gradient.ts";
import type { Tensor2D } from "../backend/tensor_types.ts";

/** The shape of an embedding queue: its length, the batch it is fed with, the embedding size and its crops. */
export interface QueueOptions {
  /** Requested length (the reference's queue_length); rounded down to a multiple of the batch. */
  readonly length: number;
  /** Samples per crop in a batch. */
  readonly batchSize: number;
  /** Embedding dimension (128 in the reference). */
  readonly dim: number;
  /** The assignment crops (one queue each), e.g. [0, 1]. */
  readonly cropsForAssign: readonly number[];
}

/** What an embedding queue holds at one moment: its rows and how many of them are filled. */
export interface QueueState {
  /** One [length, D] tensor per assignment crop, newest rows first. */
  readonly embeddings: readonly Tensor2D[];
  /** Rows written so far, capped at the length: the queue is full when it reaches it. */
  readonly filled: number;
}

/** The queue's tensors are its own: `queue[Symbol.dispose]()` (or the scope of `makeQueue`) frees them. */
export interface EmbeddingQueue extends Disposable {
  /** The length after rounding down to a multiple of the batch size. */
  readonly length: number;
  /** Samples per crop in a batch. */
  readonly batchSize: number;
  /** Embedding dimension. */
  readonly dim: number;
  /** The assignment crops, one queue each. */
  readonly cropsForAssign: readonly number[];
  /** The rows and fill count, updated atomically by `push` and read by `queueScores`. */
  readonly state: SynchronizedRef.SynchronizedRef<QueueState>;
}

/** The queue as plain arrays, for checkpoints. */
export interface SerialisedQueue {
  readonly length: number;
  readonly batchSize: number;
  readonly dim: number;
  readonly cropsForAssign: readonly number[];
  readonly filled: number;
  /** Row-major [length, dim] per assignment crop. */
  readonly embeddings: readonly Float32Array[];
}

/** A queue that cannot be made or restored as asked; `message` says why. */
export class QueueError extends Schema.TaggedError<QueueError>()("QueueError", {
  message: Schema.String,
}) {}

/** The reference's `queue_length -= queue_length % batch_size` (single process). */
export const effectiveQueueLength = (length: number, batchSize: number): number =>
  length - (length % batchSize);

/**
 * Whether the queue exists at `epoch` (0-based): the reference creates it at the
 * start of epoch `queueStartEpoch` (epoch_queue_starts) when queue_length > 0.
 */
export const queueActiveAt = (
  epoch: number,
  options: { readonly queueLength: number; readonly queueStartEpoch: number },
): boolean => options.queueLength > 0 && epoch >= options.queueStartEpoch;

const validate = (options: QueueOptions): QueueError | number => {
  const { length, batchSize, dim, cropsForAssign } = options;
  if (!Number.isInteger(batchSize) || batchSize < 1) {
    return new QueueError({ message: `batchSize must be a positive integer, got ${batchSize}` });
  }
  if (!Number.isInteger(dim) || dim < 1) {
    return new QueueError({ message: `dim must be a positive integer, got ${dim}` });
  }
  if (cropsForAssign.length === 0) return new QueueError({ message: "cropsForAssign must not be empty" });
  const rounded = effectiveQueueLength(Math.floor(length), batchSize);
  if (!(rounded > 0)) {
    return new QueueError({
      message:
        `queue length ${length} rounds down to ${rounded} at batch size ${batchSize}: use at least one batch`,
    });
  }
  return rounded;
};

const emptyState = (n: number, length: number, dim: number): QueueState => ({
  embeddings: Array.from({ length: n }, () => tf.keep(tf.zeros([length, dim]) as tf.Tensor2D)),
  filled: 0,
});

/**
 * A zero-filled queue that the caller disposes (`Symbol.dispose`; disposing
 * twice is harmless). Fails when the length rounds down to 0.
 */
export const createQueue = (options: QueueOptions): Effect.Effect<EmbeddingQueue, QueueError> =>
  Effect.gen(function* () {
    const length = validate(options);
    if (length instanceof QueueError) return yield* Effect.fail(length);
    const state = yield* SynchronizedRef.make(emptyState(options.cropsForAssign.length, length, options.dim));
    return {
      length,
      batchSize: options.batchSize,
      dim: options.dim,
      cropsForAssign: [...options.cropsForAssign],
      state,
      [Symbol.dispose]: () => disposeAll(Effect.runSync(SynchronizedRef.get(state)).embeddings),
    };
  });

/**
 * A zero-filled queue, disposed when the scope closes. Fails when the length rounds down to 0.
 *
 * @example A queue of 4 rows per assignment crop fills after two batches of 2
 * ```ts
 * import * as tf from "@tensorflow/tfjs";
 * import { Effect } from "effect";
 * import assert from "node:assert/strict";
 * import { initBackend, makeQueue, pushQueue, queueIsFull, queueScores } from "@swav/swav-ts";
 *
 * await initBackend("cpu");
 * const shapes = await Effect.runPromise(Effect.scoped(Effect.gen(function* () {
 *   const queue = yield* makeQueue({ length: 4, batchSize: 2, dim: 3, cropsForAssign: [0, 1] });
 *   const prototypes = yield* Effect.sync(() => tf.eye(5, 3) as tf.Tensor2D); // K = 5 prototypes of size 3
 *   for (let step = 0; step < 2; step++) {
 *     const embeddings = tf.randomNormal<tf.Rank.R2>([2 * 2, 3]); // 2 crops of 2 samples, crop-major
 *     yield* pushQueue(queue, embeddings);
 *     embeddings.dispose();
 *   }
 *   assert.ok(yield* queueIsFull(queue));
 *   const scores = yield* queueScores(queue, prototypes); // scored against the current prototypes
 *   prototypes.dispose();
 *   return scores?.map((s) => s.shape);
 * })));
 * assert.deepEqual(shapes, [[4, 5], [4, 5]]);
 * ```
 */
export const makeQueue = (options: QueueOptions): Effect.Effect<EmbeddingQueue, QueueError, Scope.Scope> =>
  Effect.acquireRelease(createQueue(options), (queue) => Effect.sync(() => queue[Symbol.dispose]()));

/** Whether every slot has been written (the reference: last row non-zero). */
export const isFull = (queue: EmbeddingQueue): Effect.Effect<boolean> =>
  Effect.map(SynchronizedRef.get(queue.state), (s) => s.filled >= queue.length);

const checkEmbedding = (queue: EmbeddingQueue, embedding: tf.Tensor2D): QueueError | undefined => {
  const needed = (Math.max(...queue.cropsForAssign) + 1) * queue.batchSize;
  if (embedding.rank !== 2 || embedding.shape[1] !== queue.dim || embedding.shape[0] < needed) {
    return new QueueError({
      message:
        `embedding must be crop-major [bs * crops, ${queue.dim}] with at least ${needed} rows, got [${embedding.shape}]`,
    });
  }
  return undefined;
};

/** The pushed state: the new batch in front, older rows shifted down, the oldest batch dropped. */
const pushed = (queue: EmbeddingQueue, state: QueueState, embedding: tf.Tensor2D): QueueState => {
  const { batchSize: bs, length, dim } = queue;
  const embeddings = queue.cropsForAssign.map((crop, i) =>
    tf.keep(
      withoutGradient((z, old) =>
        tf.concat([
          z.slice([crop * bs, 0], [bs, dim]),
          old.slice([0, 0], [length - bs, dim]),
        ]), [embedding, state.embeddings[i]!]) as tf.Tensor2D,
    )
  );
  return { embeddings, filled: Math.min(length, state.filled + bs) };
};

/**
 * FIFO push of this batch's detached embeddings: `embedding` is crop-major
 * [bs * totalCrops, D] (the whole batch); rows of each assignment crop go to
 * that crop's queue. The caller keeps ownership of `embedding`.
 */
export const push = (queue: EmbeddingQueue, embedding: tf.Tensor2D): Effect.Effect<void, QueueError> =>
  Effect.suspend(() => {
    const problem = checkEmbedding(queue, embedding);
    if (problem !== undefined) return Effect.fail(problem);
    return SynchronizedRef.update(queue.state, (state) => {
      const next = pushed(queue, state, embedding);
      disposeAll(state.embeddings);
      return next;
    });
  });

const scoresOf = (state: QueueState, prototypes: tf.Tensor2D): tf.Tensor2D[] =>
  state.embeddings.map((z) =>
    withoutGradient((e, w) => prototypeScores(e as tf.Tensor2D, w as tf.Tensor2D), [z, prototypes])
  );

const scopedScores = <E>(
  effect: Effect.Effect<readonly tf.Tensor2D[] | undefined, E>,
): Effect.Effect<readonly tf.Tensor2D[] | undefined, E, Scope.Scope> =>
  Effect.acquireRelease(effect, (scores) => Effect.sync(() => disposeAll(scores)));

/**
 * The queue's scores [length, K] per assignment crop, recomputed with the
 * current prototypes [K, D] (detached), or undefined while the queue is not
 * full. The tensors are owned by the caller's scope.
 */
export const queueScores = (
  queue: EmbeddingQueue,
  prototypes: tf.Tensor2D,
): Effect.Effect<readonly tf.Tensor2D[] | undefined, never, Scope.Scope> =>
  scopedScores(
    Effect.map(
      SynchronizedRef.get(queue.state),
      (state) => (state.filled >= queue.length ? scoresOf(state, prototypes) : undefined),
    ),
  );

/**
 * The reference's per-batch queue step, atomically: the queue's scores as they
 * were before this batch (undefined while not full), then the FIFO push of
 * `embedding`. Pass the scores as `queueScores` to the loss.
 */
export const scoresThenPush = (
  queue: EmbeddingQueue,
  prototypes: tf.Tensor2D,
  embedding: tf.Tensor2D,
): Effect.Effect<readonly tf.Tensor2D[] | undefined, QueueError, Scope.Scope> =>
  scopedScores(Effect.suspend(() => {
    const problem = checkEmbedding(queue, embedding);
    if (problem !== undefined) return Effect.fail(problem);
    return SynchronizedRef.modify(queue.state, (state): [readonly tf.Tensor2D[] | undefined, QueueState] => {
      const scores = state.filled >= queue.length ? scoresOf(state, prototypes) : undefined;
      const next = pushed(queue, state, embedding);
      disposeAll(state.embeddings);
      return [scores, next];
    });
  }));

/** Copies the queue to plain arrays (asynchronous reads: works on every backend). */
export const serialise = (queue: EmbeddingQueue): Effect.Effect<SerialisedQueue> =>
  Effect.flatMap(SynchronizedRef.get(queue.state), (state) =>
    // A tensor read fails only if the backend itself does: a defect, not a typed error.
    Effect.promise(async () => ({
      length: queue.length,
      batchSize: queue.batchSize,
      dim: queue.dim,
      cropsForAssign: [...queue.cropsForAssign],
      filled: state.filled,
      embeddings: await Promise.all(state.embeddings.map(async (z) => Float32Array.from(await z.data()))),
    })));

/**
 * Replaces the queue's content with `saved` (from a checkpoint). Fails when
 * its geometry differs from this queue's (length, dim, number of crops).
 */
export const restore = (queue: EmbeddingQueue, saved: SerialisedQueue): Effect.Effect<void, QueueError> =>
  Effect.suspend(() => {
    const size = queue.length * queue.dim;
    if (
      saved.length !== queue.length || saved.dim !== queue.dim ||
      saved.embeddings.length !== queue.cropsForAssign.length || saved.embeddings.some((e) =>
        e.length !== size
      )
    ) {
      return Effect.fail(
        new QueueError({
          message:
            `saved queue is ${saved.embeddings.length} x [${saved.length}, ${saved.dim}], this queue ${queue.cropsForAssign.length} x [${queue.length}, ${queue.dim}]`,
        }),
      );
    }
    if (!Number.isInteger(saved.filled) || saved.filled < 0 || saved.filled > queue.length) {
      return Effect.fail(
        new QueueError({ message: `saved queue's filled count ${saved.filled} is out of range` }),
      );
    }
    return SynchronizedRef.update(queue.state, (state) => {
      const embeddings = saved.embeddings.map((e) => tf.keep(tf.tensor2d(e, [queue.length, queue.dim])));
      disposeAll(state.embeddings);
      return { embeddings, filled: saved.filled };
    });
  });

/**
 * Data-parallel queues in one process's layout. Rank r of `size` holds, newest
 * batch first, its own `b` rows of each global batch; those rows are positions
 * r, r + size, r + 2·size, ... of the global batch (the sampler's shards: see
 * `shardOrder` in data/loader.ts). `mergeQueueRows` takes every rank's queue,
 * rank-major ([size][T·b, dim], as MPI_Gather gives them), and returns the
 * [T·B, dim] rows one process with batch B = size·b would hold; `splitQueueRows`
 * is its inverse for one rank. A world of one is the identity.
 */
export const mergeQueueRows = (
  rankMajor: Float32Array,
  dim: number,
  b: number,
  size: number,
): Float32Array => {
  const perRank = rankMajor.length / size;
  const out = new Float32Array(rankMajor.length);
  const rows = perRank / dim;
  for (let r = 0; r < size; r++) {
    for (let row = 0; row < rows; row++) {
      const t = Math.floor(row / b);
      const j = row % b;
      const global = t * b * size + j * size + r;
      out.set(rankMajor.subarray(r * perRank + row * dim, r * perRank + (row + 1) * dim), global * dim);
    }
  }
  return out;
};

/** Rank `rank`'s rows of one process's queue at global batch `batch` (the inverse of `mergeQueueRows`). */
export const splitQueueRows = (
  rows: Float32Array,
  dim: number,
  batch: number,
  size: number,
  rank: number,
): Float32Array => {
  const b = batch / size;
  const local = rows.length / dim / size;
  const out = new Float32Array(local * dim);
  for (let row = 0; row < local; row++) {
    const global = Math.floor(row / b) * batch + (row % b) * size + rank;
    out.set(rows.subarray(global * dim, (global + 1) * dim), row * dim);
  }
  return out;
};
