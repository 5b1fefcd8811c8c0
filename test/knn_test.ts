import * as tf from "@tensorflow/tfjs";
import assert from "node:assert/strict";
import { Effect } from "effect";
import { knnClassify } from "../pipelines/knn.ts";
import { assertNoTensorLeak, useBackend } from "./_helpers.ts";

/** The same weighted kNN from its definition, in float64 (ties broken by lower index, as a stable sort). */
const knnReference = (
  train: Float64Array[],
  trainLabels: Int32Array,
  test: Float64Array[],
  k: number,
  temperature: number,
  numClasses: number,
): number[][] => {
  const normalise = (v: Float64Array) => {
    const norm = Math.sqrt(v.reduce((s, x) => s + x * x, 0));
    return v.map((x) => x / norm);
  };
  const bank = train.map(normalise);
  return test.map((raw) => {
    const q = normalise(raw);
    const sims = bank.map((b, i) => ({ i, s: b.reduce((acc, x, d) => acc + x * q[d]!, 0) }));
    sims.sort((a, b) => b.s - a.s || a.i - b.i);
    const votes = new Array(numClasses).fill(0);
    for (const { i, s } of sims.slice(0, k)) votes[trainLabels[i]!] += Math.exp(s / temperature);
    return votes;
  });
};

Deno.test("kNN matches a float64 reference on random clustered features", async () => {
  await useBackend("wasm");
  const numClasses = 7;
  const dim = 16;
  const centres = Array.from(
    { length: numClasses },
    () => Float64Array.from({ length: dim }, () => Math.random() * 2 - 1),
  );
  const sample = (count: number) => {
    const labels = Int32Array.from({ length: count }, () => Math.floor(Math.random() * numClasses));
    const feats = Array.from(labels, (l) => centres[l]!.map((c) => c + (Math.random() - 0.5) * 1.5));
    return { labels, feats };
  };
  const train = sample(300);
  const test = sample(90);
  const k = 20;
  const temperature = 0.1;
  const result = await assertNoTensorLeak("knn", async () => {
    const trainT = tf.tensor2d(train.feats.map((f) => Array.from(f)));
    const testT = tf.tensor2d(test.feats.map((f) => Array.from(f)));
    // A chunk size that does not divide the test set, to exercise the last partial chunk.
    const r = await Effect.runPromise(knnClassify(trainT, train.labels, testT, test.labels, {
      k,
      temperature,
      numClasses,
      chunkSize: 32,
    }));
    tf.dispose([trainT, testT]);
    return r;
  });
  const votes = knnReference(train.feats, train.labels, test.feats, k, temperature, numClasses);
  let top1 = 0;
  let top5 = 0;
  votes.forEach((v, i) => {
    const ranked = v.map((score, c) => ({ score, c })).sort((a, b) => b.score - a.score);
    if (ranked[0]!.c === test.labels[i]) top1++;
    if (ranked.slice(0, 5).some((r) => r.c === test.labels[i])) top5++;
    // Predictions agree wherever the top vote is not a near tie (float32 vs float64).
    if (ranked[0]!.score - ranked[1]!.score > 1e-3 * ranked[0]!.score) {
      assert.equal(result.predictions[i], ranked[0]!.c);
    }
  });
  // Allow one sample of disagreement from float32 near-ties in the top-5 boundary.
  assert.ok(Math.abs(result.top1 - top1 / test.feats.length) <= 1 / test.feats.length + 1e-12);
  assert.ok(Math.abs(result.top5 - top5 / test.feats.length) <= 1 / test.feats.length + 1e-12);
  assert.ok(result.top1 > 0.5, `clustered data should classify well, got ${result.top1}`);
});
