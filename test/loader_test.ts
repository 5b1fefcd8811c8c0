/**
 * The loader: identical batches at any worker count / prefetch depth (randomness
 * keyed by (seed, epoch, index)), per-epoch shuffles, dropLast, the skip/fail
 * policy, backpressure on an endless source, and worker shutdown by the scope
 * (interruption included).
 */
import assert from "node:assert/strict";
import { Effect, Exit, Fiber, Schema, Stream } from "effect";
import {
  type Batch,
  cropPrepare,
  epochOrder,
  liveWorkers,
  LoaderError,
  type LoaderOptions,
  makeLoader,
  stackView,
} from "../data/loader.ts";
import { type DataSource, decodeRaw, openSource, type RawSample } from "../data/sources.ts";
import { randomCrop } from "../data/transforms.ts";
import { rngFor } from "../data/rng.ts";
import { DecodeError } from "../data/image_codec.ts";
import { MulticropConfig, multicropPrepare, smallImageProfile } from "../stages/multicrop.ts";

const FIXTURES = new URL("./fixtures/images/", import.meta.url);

const collectEpoch = (options: LoaderOptions, epoch: number) =>
  Effect.runPromise(
    Effect.scoped(Effect.flatMap(makeLoader(options), (loader) => Stream.runCollect(loader.epoch(epoch)))),
  );

/** A flat folder of the fixture images (PNG of every kind and JPEGs), each twice: real decoding in workers. */
const makeImageFolder = async (extra: Record<string, Uint8Array> = {}) => {
  const dir = await Deno.makeTempDir({ prefix: "swav-loader-" });
  const manifest: { cases: { file: string }[] } = JSON.parse(
    await Deno.readTextFile(new URL("expected.json", FIXTURES)),
  );
  for (const [copy, c] of manifest.cases.flatMap((c) => [[0, c], [1, c]] as const)) {
    await Deno.copyFile(new URL(c.file, FIXTURES), `${dir}/${copy}_${c.file}`);
  }
  for (const [name, bytes] of Object.entries(extra)) await Deno.writeFile(`${dir}/${name}`, bytes);
  return dir;
};

const sameBatches = (a: Batch[], b: Batch[], label: string) => {
  assert.equal(a.length, b.length, `${label}: batch count`);
  a.forEach((batch, i) => {
    assert.deepEqual(batch.indices, b[i].indices, `${label}: indices of batch ${i}`);
    assert.deepEqual(batch.labels, b[i].labels, `${label}: labels of batch ${i}`);
    assert.deepEqual(batch.views, b[i].views, `${label}: views of batch ${i}`);
  });
};

Deno.test("same seed, same batches at any worker count and prefetch; keyed by (seed, epoch, index)", async () => {
  const dir = await makeImageFolder();
  try {
    const source = await Effect.runPromise(openSource(dir));
    assert.equal(source.length, 34);
    const base = { source, prepare: cropPrepare({ size: 16, channels: 3 }), seed: 1234, batchSize: 5 };
    for (const epoch of [0, 3]) {
      const reference = await collectEpoch({ ...base, workers: 0, prefetch: 1 }, epoch);
      assert.equal(reference.length, 6, "34 samples, batch 5, dropLast: 6 batches");
      for (
        const settings of [{ workers: 0, prefetch: 16 }, { workers: 1, prefetch: 3 }, {
          workers: 3,
          maxWorkers: 3,
          prefetch: 12,
        }]
      ) {
        sameBatches(await collectEpoch({ ...base, ...settings }, epoch), reference, JSON.stringify(settings));
      }
      // The order is the keyed permutation and every crop is the keyed crop of its sample.
      const order = epochOrder(source.length, base.seed, epoch);
      assert.deepEqual([...reference.flatMap((b) => [...b.indices])], [...order].slice(0, 30));
      for (const batch of reference.slice(0, 2)) {
        for (const [k, index] of batch.indices.entries()) {
          const { image } = await Effect.runPromise(source.read(index));
          const expected = randomCrop(image, base.prepare.config, rngFor(base.seed, epoch, index));
          assert.deepEqual(batch.views[k], [expected]);
        }
      }
    }
    // Different epochs shuffle differently; a different seed gives different crops.
    const e0 = await collectEpoch({ ...base, workers: 0 }, 0);
    const e1 = await collectEpoch({ ...base, workers: 0 }, 1);
    assert.notDeepEqual([...e0[0].indices], [...e1[0].indices]);
    const other = await collectEpoch({ ...base, workers: 0, seed: 99, shuffle: false }, 0);
    const same = await collectEpoch({ ...base, workers: 0, seed: 1234, shuffle: false }, 0);
    assert.deepEqual([...other[0].indices], [0, 1, 2, 3, 4]);
    assert.notDeepEqual(other[0].views, same[0].views);
    // dropLast: false keeps the last, smaller batch.
    const all = await collectEpoch({ ...base, workers: 0, dropLast: false }, 0);
    assert.equal(all.length, 7);
    assert.equal(all[6].indices.length, 4);
    assert.equal(stackView(all[0], 0).length, 5 * 16 * 16 * 3);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("the real multi-crop in workers matches the in-thread run", async () => {
  const dir = await makeImageFolder();
  try {
    const source = await Effect.runPromise(openSource(dir));
    const config = Schema.decodeUnknownSync(MulticropConfig)(smallImageProfile);
    const base = { source, prepare: multicropPrepare(config), seed: 7, batchSize: 4 };
    const local = await collectEpoch({ ...base, workers: 0 }, 2);
    const pooled = await collectEpoch({ ...base, workers: 2 }, 2);
    sameBatches(pooled, local, "multicrop");
    const crops = config.nmbCrops.reduce((a, b) => a + b, 0);
    assert.equal(local[0].views[0].length, crops);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("skip policy counts and reports bad files; fail policy stops with the DecodeError", async () => {
  const noise = crypto.getRandomValues(new Uint8Array(200));
  const png = await Deno.readFile(new URL("png_rgb8.png", FIXTURES));
  const dir = await makeImageFolder({ "zz_noise.png": noise, "zz_truncated.png": png.subarray(0, 100) });
  try {
    const source = await Effect.runPromise(openSource(dir));
    assert.equal(source.length, 36);
    for (const workers of [0, 2]) {
      const options = {
        source,
        prepare: cropPrepare({ size: 8, channels: 1 }),
        seed: 5,
        batchSize: 4,
        workers,
      };
      const { batches, report } = await Effect.runPromise(Effect.scoped(Effect.gen(function* () {
        const loader = yield* makeLoader(options);
        const batches = yield* Stream.runCollect(loader.epoch(0));
        return { batches, report: yield* loader.skipped };
      })));
      assert.equal(batches.length, 8, "34 good samples make 8 full batches of 4");
      assert.equal(report.count, 2);
      assert.deepEqual(report.examples.map((e) => e.path).sort(), [
        `${dir}/zz_noise.png`,
        `${dir}/zz_truncated.png`,
      ]);
      assert.ok(!batches.some((b) => [...b.indices].some((i) => i >= 34)), "bad samples never reach a batch");

      const exit = await Effect.runPromiseExit(
        Effect.scoped(Effect.flatMap(
          makeLoader({ ...options, onError: "fail" }),
          (loader) => Stream.runCollect(loader.epoch(0)),
        )),
      );
      assert.ok(Exit.isFailure(exit));
      const failure = exit.cause.reasons.find((r) => r._tag === "Fail");
      assert.ok(failure?._tag === "Fail" && failure.error instanceof DecodeError);
      assert.match(failure.error.path, /zz_(noise|truncated)\.png$/);
      assert.equal(liveWorkers(), 0);
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

/** An endless synthetic source that counts fetches: memory must not grow with its length. */
const endlessSource = () => {
  const counter = { fetched: 0 };
  const fetch = (index: number) =>
    Effect.sync((): RawSample => {
      counter.fetched++;
      const data = new Uint8Array(12 * 12 * 3).fill(index % 251);
      return {
        kind: "pixels",
        path: `synthetic#${index}`,
        label: index % 10,
        image: { width: 12, height: 12, data },
      };
    });
  const source: DataSource = {
    kind: "flat",
    path: "synthetic",
    split: "train",
    length: 2 ** 31,
    channels: 3,
    fetch,
    read: (index) => Effect.flatMap(fetch(index), decodeRaw),
  };
  return { source, counter };
};

Deno.test("backpressure: a slow consumer bounds how far the loader reads ahead", async () => {
  const { source, counter } = endlessSource();
  const batchSize = 8;
  const prefetch = 6;
  const bufferBatches = 2;
  const consumed = await Effect.runPromise(Effect.scoped(Effect.gen(function* () {
    const loader = yield* makeLoader({
      source,
      prepare: cropPrepare({ size: 4, channels: 3 }, false),
      seed: 0,
      batchSize,
      shuffle: false, // a 2^31 permutation would be 8 GiB: the endless source is read in order
      workers: 1,
      prefetch,
      bufferBatches,
    });
    return yield* loader.epoch(0).pipe(
      Stream.take(5),
      Stream.mapEffect((batch) => Effect.as(Effect.sleep("20 millis"), batch)),
      Stream.runCollect,
    );
  })));
  assert.equal(consumed.length, 5);
  assert.deepEqual([...consumed[4].indices], [32, 33, 34, 35, 36, 37, 38, 39]);
  // Consumed, plus what fills the buffer, one batch being grouped, and the samples in flight.
  const bound = (5 + bufferBatches + 2) * batchSize + prefetch;
  assert.ok(
    counter.fetched <= bound,
    `read ${counter.fetched} samples ahead of 40 consumed (bound ${bound})`,
  );
  assert.equal(liveWorkers(), 0);
});

Deno.test("workers are terminated when the scope closes, interruption included", async () => {
  const { source } = endlessSource();
  const options = {
    source,
    prepare: cropPrepare({ size: 4, channels: 3 }, false),
    seed: 0,
    batchSize: 4,
    shuffle: false,
    workers: 3,
    maxWorkers: 3, // past the core cap of a small machine: the pool size is what is tested here
  };
  await Effect.runPromise(Effect.gen(function* () {
    const fiber = yield* Effect.forkChild(
      Effect.scoped(Effect.flatMap(makeLoader(options), (loader) => Stream.runDrain(loader.epoch(0)))),
    );
    yield* Effect.sleep("300 millis");
    assert.equal(liveWorkers(), 3, "the pool is running mid-epoch");
    yield* Fiber.interrupt(fiber);
  }));
  assert.equal(liveWorkers(), 0, "interruption terminated every worker");
  // A prepare module without the named export fails the stream with a LoaderError, workers or not.
  for (const workers of [0, 2]) {
    const exit = await Effect.runPromiseExit(Effect.scoped(Effect.flatMap(
      makeLoader({ ...options, workers, prepare: { ...options.prepare, name: "noSuchExport" } }),
      (loader) => Stream.runCollect(Stream.take(loader.epoch(0), 1)),
    )));
    assert.ok(Exit.isFailure(exit));
    const failure = exit.cause.reasons.find((r) => r._tag === "Fail");
    assert.ok(failure?._tag === "Fail" && failure.error instanceof LoaderError, String(exit.cause));
    assert.match(failure.error.reason, /noSuchExport/);
  }
  assert.equal(liveWorkers(), 0);
});
