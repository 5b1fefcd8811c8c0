/**
 * What data-parallel training adds to the step and the run, over the
 * communicator (backend/communicator.ts): gradients averaged over the ranks in
 * a few large all-reduces, the loss and code statistics of the global batch,
 * the model broadcast from rank 0, a parameter hash that must agree on every
 * rank (`SWAV_DEBUG_PARAMS=1`), the per-step agreement that every rank still has
 * a batch, and every rank's queue and skipped samples gathered for rank 0's
 * checkpoint and run folder. In a world of one each helper is an identity
 * (most return at once), so callers never branch on the world size and
 * single-process numbers stay as they were.
 */
import * as tf from "@tensorflow/tfjs";
import { Effect, Schema, Stream } from "effect";
import type { Communicator } from "../backend/communicator.ts";
import { wasmHeap } from "../backend/wasm_heap.ts";
import type { SwavModel } from "../models/model.ts";
import { mergeQueueRows, type SerialisedQueue, splitQueueRows } from "../state/queue.ts";
import { type SkipReport, skipReport } from "../data/loader.ts";

/** The world size does not fit the run (batch not divisible, a checkpoint's queue of another size). */
export class DataParallelError extends Schema.TaggedError<DataParallelError>()("DataParallelError", {
  message: Schema.String,
}) {}

/** Floats per all-reduce: gradients are packed into buckets of about this size (4 MB). */
export const BUCKET_FLOATS = 1 << 20;

/** The rank's share of the global batch; fails when it does not divide evenly. */
export const localBatchSize = (
  globalBatch: number,
  size: number,
): Effect.Effect<number, DataParallelError> =>
  globalBatch % size === 0 ? Effect.succeed(globalBatch / size) : Effect.fail(
    new DataParallelError({
      message: `train.batchSize ${globalBatch} does not split evenly over ${size} processes: ` +
        `use a multiple of ${size}`,
    }),
  );

/**
 * Groups `sizes` (in order) into buckets of at most `limit` floats; a single
 * tensor larger than `limit` is a bucket of its own.
 */
export const buckets = (sizes: readonly number[], limit = BUCKET_FLOATS): number[][] => {
  const out: number[][] = [];
  let current: number[] = [];
  let floats = 0;
  sizes.forEach((size, i) => {
    if (current.length > 0 && floats + size > limit) {
      out.push(current);
      current = [];
      floats = 0;
    }
    current.push(i);
    floats += size;
  });
  if (current.length > 0) out.push(current);
  return out;
};

/** Sums `views` over the ranks and divides by the world size, in place, one all-reduce per bucket. */
const averageViews = (views: readonly Float32Array[], comm: Communicator): void => {
  const scale = 1 / comm.size;
  for (const bucket of buckets(views.map((v) => v.length))) {
    if (bucket.length === 1) {
      // One large tensor: reduced where it lives (on the wasm heap, no copy).
      const view = views[bucket[0]!]!;
      comm.allReduce(view, "sum");
      for (let i = 0; i < view.length; i++) view[i] = view[i]! * scale;
      continue;
    }
    const packed = new Float32Array(bucket.reduce((n, i) => n + views[i]!.length, 0));
    let offset = 0;
    for (const i of bucket) {
      packed.set(views[i]!, offset);
      offset += views[i]!.length;
    }
    comm.allReduce(packed, "sum");
    offset = 0;
    for (const i of bucket) {
      const view = views[i]!;
      for (let k = 0; k < view.length; k++) view[k] = packed[offset + k]! * scale;
      offset += view.length;
    }
  }
};

/**
 * The gradients averaged over the ranks (the reference's DDP all-reduce before
 * LARC-SGD). On the wasm backend the gradient tensors, fresh outputs of the
 * backward owned by the step, are changed in place on the heap and returned;
 * elsewhere they are read to host copies and new tensors are returned (the
 * caller disposes them: `created`).
 */
export const averageGradients = async (
  grads: tf.NamedTensorMap,
  comm: Communicator,
): Promise<{ grads: tf.NamedTensorMap; created: tf.Tensor[] }> => {
  if (comm.size === 1) return { grads, created: [] };
  const names = Object.keys(grads);
  const heap = wasmHeap();
  if (heap !== undefined && names.every((n) => grads[n]!.dtype === "float32")) {
    // No allocation between taking the views and writing them: the heap cannot move meanwhile.
    averageViews(names.map((n) => heap.view(grads[n]!)), comm);
    return { grads, created: [] };
  }
  const host = await Promise.all(names.map(async (n) => Float32Array.from(await grads[n]!.data())));
  averageViews(host, comm);
  const created = names.map((n, i) => tf.tensor(host[i]!, grads[n]!.shape, "float32"));
  return { grads: Object.fromEntries(names.map((n, i) => [n, created[i]!])), created };
};

/** The mean of `value` over the ranks (the global batch's loss: every rank's batch has the same size). */
export const meanOverRanks = (value: number, comm: Communicator): number => {
  if (comm.size === 1) return value;
  const cell = Float64Array.of(value);
  comm.allReduce(cell, "mean");
  return cell[0]!;
};

/** Distinct prototypes that win some sample of the global batch. */
export const prototypesInUseOverRanks = (
  winners: Iterable<number>,
  prototypes: number,
  comm: Communicator,
) => {
  if (comm.size === 1) return new Set(winners).size;
  const used = new Float32Array(prototypes);
  for (const k of winners) used[k] = 1;
  comm.allReduce(used, "max");
  return used.reduce((n, u) => n + u, 0);
};

/** Every parameter and batch-norm statistic of `model` copied from rank 0 to the others. */
export const broadcastModel = async (model: SwavModel, comm: Communicator): Promise<void> => {
  if (comm.size === 1) return;
  for (const { variable } of model.params) {
    const values = Float32Array.from(await variable.data());
    comm.broadcast(values, 0);
    if (comm.rank !== 0) {
      const next = tf.tensor(values, variable.shape, "float32");
      variable.assign(next);
      next.dispose();
    }
  }
};

/** FNV-1a over the bytes of every trainable parameter: equal parameters give equal hashes. */
export const parameterHash = async (model: SwavModel): Promise<number> => {
  let hash = 0x811c9dc5;
  for (const p of model.params) {
    if (!p.trainable) continue;
    const bytes = new Uint8Array((await p.variable.data() as Float32Array).slice().buffer);
    for (let i = 0; i < bytes.length; i++) hash = Math.imul(hash ^ bytes[i]!, 0x01000193) >>> 0;
  }
  return hash;
};

/**
 * Debug check (`SWAV_DEBUG_PARAMS=1`): the parameters hash the same on every
 * rank after a step (the largest and the smallest hash over the ranks agree).
 */
export const checkParametersAgree = (model: SwavModel, comm: Communicator, step: number) =>
  Effect.gen(function* () {
    const hash = yield* Effect.promise(() => parameterHash(model));
    const extremes = Float64Array.of(hash, -hash);
    comm.allReduce(extremes, "max");
    if (extremes[0] !== -extremes[1]!) {
      return yield* new DataParallelError({
        message: `parameters differ between ranks after step ${step + 1} (hash ${hash} on rank ${comm.rank})`,
      });
    }
    return hash;
  });

/** Whether `debugParams` is asked for (`SWAV_DEBUG_PARAMS=1`). */
export const debugParamsRequested = (): boolean => {
  try {
    return Deno.env.get("SWAV_DEBUG_PARAMS") === "1";
  } catch {
    return false;
  }
};

/** True when every rank has a batch for this step (a rank that skipped samples may run out first). */
export const everyRankHasBatch = (has: boolean, comm: Communicator): boolean => {
  if (comm.size === 1) return has;
  const missing = Float32Array.of(has ? 0 : 1);
  comm.allReduce(missing, "max");
  return missing[0] === 0;
};

/**
 * An epoch's batches as the ranks step through them together, and the check that starts each step.
 * A rank that skipped unreadable samples may run out of batches first: with several ranks the stream
 * ends with a marker (undefined) and each step first agrees that every rank has a batch; once one has
 * none, every rank ends the epoch there. On one rank the batches are as they are and every step goes.
 */
export const batchesOverRanks = <A, E, R>(batches: Stream.Stream<A, E, R>, comm: Communicator) => {
  const stream: Stream.Stream<A | undefined, E, R> = comm.size === 1
    ? batches
    : Stream.concat(batches, Stream.make(undefined));
  let ended = false;
  /** Whether this step runs: false from the first step where some rank has no batch. Collective. */
  const proceed = (batch: A | undefined): batch is A => {
    if (ended) return false;
    if (!everyRankHasBatch(batch !== undefined, comm)) ended = true;
    return batch !== undefined && !ended;
  };
  return { stream, proceed };
};

/**
 * Every rank's queue, gathered in the layout one process would hold for the
 * global batch (`mergeQueueRows`), on rank 0 (undefined elsewhere). Collective.
 */
export const gatherQueue = (saved: SerialisedQueue, comm: Communicator): SerialisedQueue | undefined => {
  const embeddings = saved.embeddings.map((rows) => comm.gather(rows, 0));
  if (comm.rank !== 0) return undefined;
  return {
    ...saved,
    length: saved.length * comm.size,
    batchSize: saved.batchSize * comm.size,
    filled: saved.filled * comm.size,
    embeddings: embeddings.map((all) => mergeQueueRows(all!, saved.dim, saved.batchSize, comm.size)),
  };
};

/** Every rank's text on rank 0, in rank order (undefined elsewhere), one byte a float. Collective. */
export const gatherTexts = (text: string, comm: Communicator): string[] | undefined => {
  const bytes = new TextEncoder().encode(text);
  const longest = Float64Array.of(bytes.length);
  comm.allReduce(longest, "max");
  // Each rank sends [its length, its bytes, padding]: the same number of floats everywhere.
  const stride = 1 + longest[0]!;
  const row = new Float32Array(stride);
  row[0] = bytes.length;
  row.set(bytes, 1);
  const all = comm.gather(row, 0);
  if (all === undefined) return undefined;
  return Array.from({ length: comm.size }, (_, rank) => {
    const at = rank * stride;
    return new TextDecoder().decode(Uint8Array.from(all.subarray(at + 1, at + 1 + all[at]!)));
  });
};

/**
 * Every rank's skipped samples on rank 0 (undefined elsewhere): the counts summed, the samples of all
 * shards in sample-index order, each once with the first epoch it was skipped in. Collective.
 */
export const gatherSkipReports = (report: SkipReport, comm: Communicator): SkipReport | undefined => {
  // One rank's report as it is (no regrouping by sample: skipped.jsonl keeps the order it was found in).
  if (comm.size === 1) return report;
  const texts = gatherTexts(JSON.stringify({ count: report.count, samples: report.samples }), comm);
  if (texts === undefined) return undefined;
  const reports = texts.map((text) => JSON.parse(text) as Pick<SkipReport, "count" | "samples">);
  const byIndex = new Map<number, SkipReport["samples"][number]>();
  for (const sample of reports.flatMap((r) => r.samples)) {
    const seen = byIndex.get(sample.index);
    if (seen === undefined || sample.epoch < seen.epoch) byIndex.set(sample.index, sample);
  }
  return skipReport(
    reports.reduce((sum, r) => sum + r.count, 0),
    [...byIndex.values()].sort((a, b) => a.index - b.index),
  );
};

/**
 * A checkpoint's queue (one process's layout) as rank `rank` of `size` holds
 * it; fails naming the world sizes that fit when it cannot be split evenly.
 */
export const shardQueue = (
  saved: SerialisedQueue,
  comm: Pick<Communicator, "rank" | "size">,
): Effect.Effect<SerialisedQueue, DataParallelError> => {
  const { size, rank } = comm;
  if (size === 1) return Effect.succeed(saved);
  if (saved.batchSize % size !== 0 || saved.length % saved.batchSize !== 0 || saved.filled % size !== 0) {
    return Effect.fail(
      new DataParallelError({
        message: `the checkpoint's queue (${saved.length} rows, batch ${saved.batchSize}) cannot be split ` +
          `over ${size} processes: resume with a number of processes that divides ${saved.batchSize}`,
      }),
    );
  }
  return Effect.succeed({
    ...saved,
    length: saved.length / size,
    batchSize: saved.batchSize / size,
    filled: saved.filled / size,
    embeddings: saved.embeddings.map((rows) => splitQueueRows(rows, saved.dim, saved.batchSize, size, rank)),
  });
};
