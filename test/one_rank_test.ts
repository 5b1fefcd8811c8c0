/**
 * The data-parallel helpers on a world of one: each is an identity (or says "nothing to do" with
 * undefined), so the pipelines call them unconditionally and single-process numbers stay bit-identical.
 */
import * as tf from "@tensorflow/tfjs";
import { Effect, Stream } from "effect";
import assert from "node:assert/strict";
import { singleProcess } from "../backend/communicator.ts";
import { skipReport } from "../data/loader.ts";
import {
  averageGradients,
  batchesOverRanks,
  everyRankHasBatch,
  gatherSkipReports,
  meanOverRanks,
  prototypesInUseOverRanks,
} from "../pipelines/data_parallel.ts";
import {
  embeddingStd,
  embeddingStdOverRanks,
  gatheredRows,
  kmeansReduce,
  lossDivisors,
  startCentroids,
} from "../pipelines/data_parallel_methods.ts";
import { makeMemoryBank } from "../state/memory_bank.ts";

const one = singleProcess;

Deno.test("one rank: the step's collectives give the rank's own values", async () => {
  assert.equal(everyRankHasBatch(true, one), true);
  assert.equal(everyRankHasBatch(false, one), false);
  // A value float64 cannot hold in float32: no rounding through a float32 buffer.
  const value = Math.PI * (1 + Math.random());
  assert.equal(meanOverRanks(value, one), value);
  const winners = Int32Array.from({ length: 64 }, () => Math.floor(Math.random() * 10));
  assert.equal(prototypesInUseOverRanks(winners, 10, one), new Set(winners).size);
  const grads = { a: tf.randomNormal([3, 4]), b: tf.randomNormal([5]) };
  const averaged = await averageGradients(grads, one);
  assert.equal(averaged.grads, grads);
  assert.deepEqual(averaged.created, []);
  tf.dispose(Object.values(grads));
});

Deno.test("one rank: the skip report as it is, duplicates and order kept", () => {
  const samples = [
    { index: 7, path: "b.png", reason: "truncated", epoch: 0 },
    { index: 2, path: "a.png", reason: "truncated", epoch: 0 },
    { index: 7, path: "b.png", reason: "truncated", epoch: 1 },
  ];
  const report = skipReport(3, samples);
  assert.equal(gatherSkipReports(report, one), report);
});

Deno.test("one rank: the epoch's batches as they are, every step goes", async () => {
  const items = Array.from({ length: 5 }, (_, i) => ({ i }));
  const { stream, proceed } = batchesOverRanks(Stream.fromIterable(items), one);
  const seen = await Effect.runPromise(Stream.runCollect(stream));
  assert.deepEqual(seen, items);
  assert.ok(seen.every((batch) => proceed(batch)));
});

Deno.test("one rank: DeepCluster-v2's and SimCLR's collectives have nothing to do", async () => {
  assert.equal(kmeansReduce(one), undefined);
  assert.equal(lossDivisors([Int32Array.of(0, -100, 3)], 2, one), undefined);
  const bank = makeMemoryBank({ size: 6, dim: 4, crops: 1, heads: 1 });
  assert.equal(startCentroids(bank, 0, Int32Array.of(0, 1, 2), Int32Array.of(0, 2), one), undefined);
  const rows = tf.randomNormal([8, 16]) as tf.Tensor2D;
  assert.equal(gatheredRows(rows, 2, one), undefined);
  assert.equal(await embeddingStdOverRanks(rows, one), await embeddingStd(rows));
  rows.dispose();
});
