/**
 * The data-parallel sampler (`shardOrder` in data/loader.ts): PyTorch's
 * DistributedSampler shards (fixtures from reference/sampler_reference.py),
 * shards of a shuffled epoch that are disjoint apart from the padding and
 * together cover it, and a sharded loader whose ranks' batch k together are
 * one process's batch k with the same crops (augmentation keyed by sample, not
 * by rank).
 */
import assert from "node:assert/strict";
import { Effect, Stream } from "effect";
import { type Batch, cropPrepare, epochOrder, makeLoader, shardOrder } from "../data/loader.ts";
import { type DataSource, decodeRaw, type RawSample } from "../data/sources.ts";

const FIXTURE = new URL("./fixtures/sampler.json", import.meta.url);

Deno.test("shardOrder: PyTorch DistributedSampler's shards (no shuffle, padded by wrapping)", async () => {
  const cases: { n: number; size: number; shards: number[][] }[] = JSON.parse(
    await Deno.readTextFile(FIXTURE),
  );
  assert.ok(cases.length > 20);
  for (const { n, size, shards } of cases) {
    for (let rank = 0; rank < size; rank++) {
      assert.deepEqual(
        shardOrder(epochOrder(n, 7, 0, false), rank, size),
        shards[rank],
        `n ${n} size ${size}`,
      );
    }
  }
});

Deno.test("shardOrder: shards of a shuffled epoch are disjoint apart from the padding and cover it", () => {
  const seed = Math.floor(Math.random() * 1e6);
  for (const n of [1, 9, 64, 101, 1000]) {
    for (const size of [2, 3, 4, 8]) {
      for (const epoch of [0, 3]) {
        const order = [...epochOrder(n, seed, epoch)];
        const shards = Array.from({ length: size }, (_, r) => shardOrder(order, r, size));
        const per = Math.ceil(n / size);
        assert.ok(shards.every((s) => s.length === per), `seed ${seed}: equal shard lengths`);
        const all = shards.flat();
        assert.equal(new Set(all).size, n, `seed ${seed} n ${n} size ${size}: every sample in some shard`);
        // Padding: exactly per·size − n repeats, which are the order's first samples.
        const padding = per * size - n;
        const counts = new Map<number, number>();
        for (const i of all) counts.set(i, (counts.get(i) ?? 0) + 1);
        const repeated = [...counts].filter(([, c]) => c > 1).map(([i]) => i).sort((a, b) => a - b);
        const expected = padding <= n
          ? order.slice(0, padding).sort((a, b) => a - b)
          : [...new Set(order)].sort((a, b) => a - b);
        assert.deepEqual(repeated, expected, `seed ${seed} n ${n} size ${size}: padding wraps to the start`);
        assert.equal(all.length - n, padding);
      }
    }
  }
});

const syntheticSource = (length: number): DataSource => {
  const fetch = (index: number) =>
    Effect.sync((): RawSample => ({
      kind: "pixels",
      path: `synthetic#${index}`,
      label: index % 10,
      image: {
        width: 10,
        height: 10,
        data: Uint8Array.from({ length: 300 }, (_, i) => (index * 31 + i) % 256),
      },
    }));
  return {
    kind: "flat",
    path: "synthetic",
    split: "train",
    length,
    channels: 3,
    fetch,
    read: (index) => Effect.flatMap(fetch(index), decodeRaw),
  };
};

const epochBatches = (
  length: number,
  batchSize: number,
  epoch: number,
  shard?: { rank: number; size: number },
) =>
  Effect.runPromise(Effect.scoped(Effect.gen(function* () {
    const loader = yield* makeLoader({
      source: syntheticSource(length),
      prepare: cropPrepare({ size: 6, channels: 3 }),
      seed: 5,
      batchSize,
      ...(shard === undefined ? {} : { shard }),
    });
    return { batches: [...yield* Stream.runCollect(loader.epoch(epoch))], perEpoch: loader.batchesPerEpoch };
  })));

Deno.test("a sharded loader: the ranks' batch k together is one process's batch k, same crops", async () => {
  const [length, global, size] = [48, 8, 4];
  for (const epoch of [0, 1]) {
    const whole = await epochBatches(length, global, epoch);
    const ranks = await Promise.all(
      Array.from({ length: size }, (_, rank) => epochBatches(length, global / size, epoch, { rank, size })),
    );
    assert.ok(ranks.every((r) => r.perEpoch === whole.perEpoch && r.batches.length === whole.batches.length));
    whole.batches.forEach((batch: Batch, k) => {
      const crops = new Map<number, Float32Array>();
      batch.indices.forEach((index, j) => crops.set(index, batch.views[j]![0]!));
      const union = ranks.flatMap((r) => [...r.batches[k]!.indices]);
      assert.deepEqual([...union].sort((a, b) => a - b), [...batch.indices].sort((a, b) => a - b));
      for (const r of ranks) {
        r.batches[k]!.indices.forEach((index, j) =>
          assert.deepEqual(r.batches[k]!.views[j]![0], crops.get(index))
        );
      }
    });
  }
});
