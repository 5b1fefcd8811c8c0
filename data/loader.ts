/**
 * The data loader: an Effect `Stream` of batches over a `DataSource`.
 *
 * Per epoch the sample order is `rngFor(seed, epoch).permutation(length)` (or
 * 0..n-1 without shuffling). For each index the main thread fetches the raw
 * sample (file bytes or record pixels: I/O, cheap) and a pool of Deno Workers
 * does the CPU work, decode then `prepare(image, config, rngFor(seed, epoch,
 * index))`, with buffers transferred both ways. Results come back in order, so
 * batches are identical whatever the worker count or prefetch depth.
 *
 * Memory is bounded: at most `prefetch` samples are in flight and at most
 * `bufferBatches` batches wait for the consumer (backpressure beyond that), so
 * a data set far larger than RAM streams through.
 *
 * Bad samples follow `onError`: `skip` drops them and records every one (path
 * and reason, in sample-index order, the same whatever the worker count); at the
 * end of each epoch a summary goes to stderr, naming each newly skipped sample on
 * a line of its own (at most `SKIPPED_LINES` over the loader's life, then a count),
 * and `skipped` returns them all. `fail` fails the stream with the `DecodeError`.
 *
 * The worker count is capped at the number of CPU cores (with a warning): more
 * workers cannot decode faster, and each costs tens of MB.
 */
import { Console, Effect, type Result, Schema, type Scope, Stream } from "effect";
import { DecodeError, decodeImage, type JpegDecoder, type RgbImage } from "./image_codec.ts";
import { reasonOf } from "./errors.ts";
import type { DataSource, RawSample } from "./sources.ts";
import { type Rng, rngFor } from "./rng.ts";
import { epochOrder, shardLength, shardOrder } from "./epoch_order.ts";

export { epochOrder, shardLength, shardOrder } from "./epoch_order.ts";
/**
 * A per-sample transform, named by module URL and export so Workers can import it:
 * `module[name](image, config, rng)` returns one buffer per view (or one buffer).
 * `config` must be structured-cloneable (plain JSON is).
 */
export interface PrepareRef<C = unknown> {
  /** URL of the module that exports the transform (`import.meta.url` of its file). */
  readonly module: string;
  /** The export's name in that module. */
  readonly name: string;
  /** Passed to the transform with every image. */
  readonly config: C;
}

export type PrepareFn<C = unknown> = (image: RgbImage, config: C, rng: Rng) => Float32Array | Float32Array[];

/** A random or centred square crop scaled to [0, 1] (`data/transforms.ts`); light, for tests and benchmarks. */
export const cropPrepare = (
  config: { size: number; channels: 1 | 3 },
  random = true,
): PrepareRef<{ size: number; channels: 1 | 3 }> => ({
  module: new URL("./transforms.ts", import.meta.url).href,
  name: random ? "randomCrop" : "centreCrop",
  config,
});

/** A loader failure that is not about one sample's data: a broken prepare module, a crashed worker. */
export class LoaderError extends Schema.TaggedError<LoaderError>()("LoaderError", {
  reason: Schema.String,
}) {
  /** The reason, as given. */
  override get message(): string {
    return this.reason;
  }
}

/** One sample after its prepare function ran: its index in the source, its label and its view buffers. */
export interface PreparedSample {
  /** Index in the source. */
  readonly index: number;
  /** Class label, -1 when unlabelled. */
  readonly label: number;
  /** The prepared views (crops), each a CHW float buffer. */
  readonly views: Float32Array[];
}

/** One batch: sample indices, labels (-1 when unlabelled) and, per sample, its view buffers. */
export interface Batch {
  /** The epoch the batch belongs to. */
  readonly epoch: number;
  /** Each sample's index in the source. */
  readonly indices: Int32Array;
  /** Each sample's label, -1 when unlabelled. */
  readonly labels: Int32Array;
  /** `views[sample][view]`: for multi-crop, crop order as `multicropSample` returns it. */
  readonly views: Float32Array[][];
}

/** View `view` of every sample of a batch, concatenated (batch-major), ready for a tensor. */
export const stackView = (batch: Batch, view: number): Float32Array => {
  const size = batch.views[0]?.[view]?.length ?? 0;
  const out = new Float32Array(batch.views.length * size);
  batch.views.forEach((views, i) => out.set(views[view], i * size));
  return out;
};

/** What `makeLoader` reads, how it prepares each sample, and how it batches and parallelises. */
export interface LoaderOptions {
  /** The data set to read (`openSource`). */
  readonly source: DataSource;
  /** The per-sample preparation, by module and export name so workers can import it (`multicropPrepare`, `evalPrepare`). */
  readonly prepare: PrepareRef;
  /** Seeds the shuffling and every sample's augmentation (with the epoch and sample index). */
  readonly seed: number;
  /** Samples per batch. */
  readonly batchSize: number;
  /** Drop the last, smaller batch of an epoch (default true). */
  readonly dropLast?: boolean;
  /** Shuffle each epoch (default true; false for evaluation). */
  readonly shuffle?: boolean;
  /** Worker count; 0 prepares on the calling thread (default 0). */
  readonly workers?: number;
  /** Most workers started; more are capped with a warning (default: the number of CPU cores). */
  readonly maxWorkers?: number;
  /** Samples in flight at once (default max(8, 4 x workers)). */
  readonly prefetch?: number;
  /** Finished batches held ahead of the consumer (default 2). */
  readonly bufferBatches?: number;
  /** What an undecodable sample does: skip it (counted in `skipped`) or fail the epoch (default "fail"). */
  readonly onError?: "skip" | "fail";
  /** The JPEG decoder to use (default "auto": libturbojpeg when installed). */
  readonly jpeg?: JpegDecoder;
  /** This rank's part of each epoch in a data-parallel job (`shardOrder`); the whole epoch without. */
  readonly shard?: { readonly rank: number; readonly size: number };
}

/** One skipped sample: its index in the source, the epoch it was first skipped in, its path and why. */
export interface SkippedSample {
  /** Index in the source. */
  readonly index: number;
  /** The epoch it was first skipped in. */
  readonly epoch: number;
  /** The file (or record) that names it. */
  readonly path: string;
  /** Why it could not be decoded. */
  readonly reason: string;
}

/** The samples a loader skipped so far, counted and listed. */
export interface SkipReport {
  /** Skips so far, all epochs together (a sample bad in every epoch counts once per epoch). */
  readonly count: number;
  /** Every distinct skipped sample, in sample-index order (e.g. for a run folder's `skipped.jsonl`). */
  readonly samples: ReadonlyArray<SkippedSample>;
  /** The first 10 of `samples`, for a short summary. */
  readonly examples: ReadonlyArray<{ readonly path: string; readonly reason: string }>;
}

/** A skip report from the count and the distinct samples, in sample-index order. */
export const skipReport = (count: number, samples: ReadonlyArray<SkippedSample>): SkipReport => ({
  count,
  samples,
  examples: samples.slice(0, 10).map(({ path, reason }) => ({ path, reason })),
});

/** Skipped samples named on stderr over a loader's life, one line each; the rest are counted. */
export const SKIPPED_LINES = 50;

/** The worker count used for `requested` with at most `cores` allowed, and the warning when it is capped. */
export const cappedWorkers = (requested: number, cores: number): { workers: number; warning?: string } =>
  requested > cores && cores > 0
    ? {
      workers: cores,
      warning:
        `workers: ${requested} requested, capped at ${cores} (the number of CPU cores; more cannot decode faster)`,
    }
    : { workers: requested };

const coreCount = (): number => {
  const n = globalThis.navigator?.hardwareConcurrency;
  return typeof n === "number" && Number.isInteger(n) && n > 0 ? n : 1;
};

/**
 * Batches of prepared samples from a data source, one stream per epoch,
 * shuffled and augmented reproducibly from the seed; made by `makeLoader`.
 */
export interface Loader {
  /** The data set read. */
  readonly source: DataSource;
  /** Batches per epoch when nothing is skipped. */
  readonly batchesPerEpoch: number;
  /** The batches of one epoch; each run of the stream starts the epoch afresh. */
  epoch(epoch: number): Stream.Stream<Batch, DecodeError | LoaderError>;
  /** Samples skipped so far (all epochs) under `onError: "skip"`. */
  readonly skipped: Effect.Effect<SkipReport>;
}

/** Imports a prepare function; fails with a `LoaderError` when the module or export is missing. */
export const importPrepare = (ref: PrepareRef): Effect.Effect<PrepareFn, LoaderError> =>
  Effect.tryPromise({
    try: () => import(ref.module),
    catch: (cause) => new LoaderError({ reason: `cannot load prepare: ${reasonOf(cause)}` }),
  }).pipe(Effect.flatMap((module) => {
    const fn = module[ref.name];
    return typeof fn === "function" ? Effect.succeed(fn as PrepareFn) : Effect.fail(
      new LoaderError({ reason: `cannot load prepare: ${ref.module} has no exported function ${ref.name}` }),
    );
  }));

/** `importPrepare` run once and remembered, as a promise that never rejects (workers and the local pool). */
export const importPrepareOnce = (ref: PrepareRef): Promise<Result.Result<PrepareFn, LoaderError>> =>
  Effect.runPromise(Effect.result(importPrepare(ref)));

// ---------------------------------------------------------------------------------------------
// Worker protocol

/** Main thread to worker. */
export type WorkerRequest =
  | { readonly type: "init"; readonly prepare: PrepareRef; readonly jpeg: JpegDecoder }
  | {
    readonly type: "task";
    readonly id: number;
    readonly seed: number;
    readonly epoch: number;
    readonly index: number;
    readonly raw: RawSample;
  };

/** Worker to main thread. `decode` errors follow the skip/fail policy; `fatal` ones always fail. */
export type WorkerResponse =
  | { readonly type: "done"; readonly id: number; readonly views: Float32Array[] }
  | {
    readonly type: "error";
    readonly id: number;
    readonly kind: "decode" | "fatal";
    readonly path: string;
    readonly reason: string;
  };

/** The buffer of `array` if transferring it moves only this array's bytes, else none (it gets copied). */
export const transferable = (array: ArrayBufferView): ArrayBuffer[] =>
  array.buffer instanceof ArrayBuffer && array.byteOffset === 0 &&
    array.byteLength === array.buffer.byteLength
    ? [array.buffer]
    : [];

let workersAlive = 0;
/** Workers started by loaders and not yet terminated (for tests and diagnostics). */
export const liveWorkers = (): number => workersAlive;

interface Pool {
  run(
    index: number,
    epoch: number,
    seed: number,
    raw: RawSample,
  ): Effect.Effect<Float32Array[], DecodeError | LoaderError>;
}

/** Starts `size` workers; the scope's finalizer terminates them (interruption included). */
const makePool = (
  size: number,
  prepare: PrepareRef,
  jpeg: JpegDecoder,
): Effect.Effect<Pool, never, Scope.Scope> =>
  Effect.acquireRelease(
    Effect.sync(() => {
      type Resume = (result: Effect.Effect<Float32Array[], DecodeError | LoaderError>) => void;
      const slots = Array.from({ length: size }, () => {
        const worker = new Worker(new URL("./worker.ts", import.meta.url).href, { type: "module" });
        workersAlive++;
        const pending = new Map<number, Resume>();
        const slot = { worker, pending, broken: undefined as string | undefined };
        worker.onmessage = (event: MessageEvent<WorkerResponse>) => {
          const message = event.data;
          const resume = pending.get(message.id);
          if (!resume) return; // interrupted meanwhile
          pending.delete(message.id);
          if (message.type === "done") resume(Effect.succeed(message.views));
          else if (message.kind === "decode") {
            resume(Effect.fail(new DecodeError({ path: message.path, reason: message.reason })));
          } else resume(Effect.fail(new LoaderError({ reason: `${message.path}: ${message.reason}` })));
        };
        worker.onerror = (event: ErrorEvent) => {
          // Keep a worker's crash from taking the main thread down; fail its tasks instead.
          event.preventDefault();
          slot.broken = `data worker crashed: ${event.message}`;
          for (const resume of pending.values()) {
            resume(Effect.fail(new LoaderError({ reason: slot.broken })));
          }
          pending.clear();
        };
        worker.postMessage({ type: "init", prepare, jpeg } satisfies WorkerRequest);
        return slot;
      });
      let nextId = 0;
      const pool: Pool & { close(): void } = {
        run: (index, epoch, seed, raw) =>
          Effect.callback<Float32Array[], DecodeError | LoaderError>((resume) => {
            // Least-loaded worker: keeps every worker busy when samples differ in cost.
            const slot = slots.reduce((best, s) => (s.pending.size < best.pending.size ? s : best));
            if (slot.broken) return resume(Effect.fail(new LoaderError({ reason: slot.broken })));
            const id = nextId++;
            slot.pending.set(id, resume);
            const payload = raw.kind === "encoded" ? raw.bytes : raw.image.data;
            slot.worker.postMessage(
              { type: "task", id, seed, epoch, index, raw } satisfies WorkerRequest,
              transferable(payload),
            );
            return Effect.sync(() => slot.pending.delete(id));
          }),
        close: () => {
          for (const slot of slots) {
            slot.worker.terminate();
            workersAlive--;
          }
        },
      };
      return pool;
    }),
    (pool) => Effect.sync(() => pool.close()),
  );

/** The in-thread "pool": the same work on the calling thread (workers: 0). */
const makeLocal = (prepare: PrepareRef, jpeg: JpegDecoder): Pool => {
  let loaded: Promise<Result.Result<PrepareFn, LoaderError>> | undefined;
  return {
    run: (index, epoch, seed, raw) =>
      Effect.gen(function* () {
        const fn = yield* Effect.flatMap(
          Effect.promise(() => (loaded ??= importPrepareOnce(prepare))),
          Effect.fromResult,
        );
        const image = raw.kind === "encoded" ? yield* decodeImage(raw.bytes, raw.path, { jpeg }) : raw.image;
        return yield* Effect.try({
          try: () => asViews(fn(image, prepare.config, rngFor(seed, epoch, index))),
          catch: (cause) => new LoaderError({ reason: `${raw.path}: prepare failed: ${reasonOf(cause)}` }),
        });
      }),
  };
};

/** A prepare result as a list of views. */
export const asViews = (out: Float32Array | Float32Array[]): Float32Array[] =>
  Array.isArray(out) ? out : [out];

/**
 * Builds a loader; with `workers > 0` its worker pool lives as long as the scope.
 *
 * @example One epoch of a tiny generated data set, in batches of 8
 * ```ts
 * import { Effect, Stream } from "effect";
 * import assert from "node:assert/strict";
 * import { evalPrepare, makeLoader, openSource, writeDemoDataset } from "@swav/swav-ts";
 *
 * const folder = await Deno.makeTempDir();
 * await writeDemoDataset({ folder, perClassTrain: 2, perClassTest: 1, size: 16, seed: 1 }); // 10 classes
 * const batches = await Effect.runPromise(Effect.scoped(Effect.gen(function* () {
 *   const source = yield* openSource(`${folder}:train`);
 *   const loader = yield* makeLoader({
 *     source,
 *     prepare: evalPrepare({ size: 16, channels: 3, mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25] }),
 *     seed: 0,
 *     batchSize: 8,
 *   });
 *   return yield* Stream.runCollect(loader.epoch(0));
 * })));
 * assert.equal(batches.length, 2); // 20 images, the last partial batch dropped
 * assert.equal(batches[0]!.views[0]![0]!.length, 16 * 16 * 3);
 * await Deno.remove(folder, { recursive: true });
 * ```
 */
export const makeLoader = (options: LoaderOptions): Effect.Effect<Loader, LoaderError, Scope.Scope> =>
  Effect.gen(function* () {
    const {
      source,
      prepare,
      seed,
      batchSize,
      dropLast = true,
      shuffle = true,
      workers = 0,
      bufferBatches = 2,
      onError = "skip",
      jpeg = "auto",
      shard,
    } = options;
    if (shard !== undefined && !(shard.size >= 1 && shard.rank >= 0 && shard.rank < shard.size)) {
      return yield* new LoaderError({ reason: `shard ${shard.rank} of ${shard.size} does not exist` });
    }
    const perEpoch = shardLength(source.length, shard?.size ?? 1);
    if (!(Number.isInteger(batchSize) && batchSize > 0)) {
      return yield* new LoaderError({ reason: `batchSize must be a positive integer, got ${batchSize}` });
    }
    if (!(Number.isInteger(workers) && workers >= 0)) {
      return yield* new LoaderError({ reason: `workers must be a non-negative integer, got ${workers}` });
    }
    const capped = cappedWorkers(workers, options.maxWorkers ?? coreCount());
    if (capped.warning !== undefined) yield* Console.error(`warning: ${capped.warning}`);
    const prefetch = Math.max(1, options.prefetch ?? Math.max(8, 4 * capped.workers));
    const pool = capped.workers > 0
      ? yield* makePool(capped.workers, prepare, jpeg)
      : makeLocal(prepare, jpeg);
    const skips = { count: 0, byIndex: new Map<number, SkippedSample>(), lines: 0 };

    // A skip is a value here, recorded below in stream order: the record does not depend on which
    // worker finishes first.
    const sample = (index: number, epoch: number) =>
      source.fetch(index).pipe(
        Effect.flatMap((raw) =>
          pool.run(index, epoch, seed, raw).pipe(
            Effect.map((views): PreparedSample => ({ index, label: raw.label, views })),
          )
        ),
        Effect.catchTag("DecodeError", (error) =>
          onError === "fail"
            ? Effect.fail(error)
            : Effect.succeed({ skipped: { index, epoch, path: error.path, reason: error.reason } })),
      );

    /** The epoch's summary: a count, then each sample not skipped before, in index order, one line each. */
    const report = (epoch: number, skipped: number, fresh: SkippedSample[]) =>
      Effect.suspend(() => {
        if (skipped === 0) return Effect.void;
        fresh.sort((a, b) => a.index - b.index);
        const shown = fresh.slice(0, Math.max(0, SKIPPED_LINES - skips.lines));
        skips.lines += shown.length;
        const hidden = fresh.length - shown.length;
        const lines = [
          `warning: epoch ${epoch + 1}: skipped ${skipped} unreadable samples` +
          (fresh.length === skipped ? ":" : ` (${skipped - fresh.length} of them named before)`),
          ...shown.map((s) => `warning:   skipped ${s.path}: ${s.reason}`),
          ...(hidden > 0 ? [`warning:   ... and ${hidden} more skipped samples not named here`] : []),
        ];
        return Console.error(lines.join("\n"));
      });

    const epochStream = (epoch: number): Stream.Stream<Batch, DecodeError | LoaderError> =>
      Stream.suspend(() => {
        let skipped = 0;
        const fresh: SkippedSample[] = [];
        const order = epochOrder(source.length, seed, epoch, shuffle);
        const mine = shard === undefined ? order : shardOrder(order, shard.rank, shard.size);
        return Stream.fromIterable(mine).pipe(
          // Ordered: batches do not depend on which worker finishes first.
          Stream.mapEffect((index) => sample(index, epoch), { concurrency: prefetch }),
          Stream.filter((s): s is PreparedSample => {
            if ("skipped" in s) {
              skips.count++;
              skipped++;
              if (!skips.byIndex.has(s.skipped.index)) {
                skips.byIndex.set(s.skipped.index, s.skipped);
                fresh.push(s.skipped);
              }
              return false;
            }
            return true;
          }),
          Stream.grouped(batchSize),
          Stream.filter((group) => !dropLast || group.length === batchSize),
          Stream.map((group): Batch => ({
            epoch,
            indices: Int32Array.from(group, (s) => s.index),
            labels: Int32Array.from(group, (s) => s.label),
            views: group.map((s) => s.views),
          })),
          Stream.buffer({ capacity: bufferBatches }),
          // Also when the consumer stops early (a max-steps cap): what was skipped so far is named.
          Stream.ensuring(Effect.suspend(() => report(epoch, skipped, fresh))),
        );
      });

    const allSkipped = () => [...skips.byIndex.values()].sort((a, b) => a.index - b.index);

    return {
      source,
      batchesPerEpoch: dropLast ? Math.floor(perEpoch / batchSize) : Math.ceil(perEpoch / batchSize),
      epoch: epochStream,
      skipped: Effect.sync(() => skipReport(skips.count, allSkipped())),
    } satisfies Loader;
  });
