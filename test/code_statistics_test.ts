/**
 * The step's code statistics (metrics.jsonl's `code_entropy` and
 * `prototypes_in_use`, which the collapse check reads) against float64
 * written here, on fresh random codes of several sharpnesses, one-hot and
 * uniform rows included.
 */
import * as tf from "@tensorflow/tfjs";
import assert from "node:assert/strict";
import { codeStatistics } from "../pipelines/swav_step.ts";
import { rngFor } from "../data/rng.ts";
import { assertNoTensorLeak, useBackend } from "./_helpers.ts";

await useBackend("wasm");

const seed = Date.now() % 1_000_000;
const random = rngFor(seed);

/** Rows of softmax(sharpness · N(0, 1)) [rows, k], as float32 values. */
const codes = (rows: number, k: number, sharpness: number): Float32Array => {
  const out = new Float32Array(rows * k);
  for (let r = 0; r < rows; r++) {
    const logits = Array.from(
      { length: k },
      () => sharpness * (random.next() + random.next() + random.next() - 1.5),
    );
    const m = Math.max(...logits);
    const e = logits.map((x) => Math.exp(x - m));
    const s = e.reduce((a, b) => a + b, 0);
    e.forEach((x, j) => (out[r * k + j] = x / s));
  }
  return out;
};

Deno.test(`codeStatistics: mean row entropy in nats and distinct argmax prototypes, as float64 (seed ${seed})`, async () => {
  await assertNoTensorLeak("statistics", async () => {
    for (const [bs, k, sharpness] of [[8, 5, 1], [16, 30, 4], [7, 100, 20]] as const) {
      const parts = [codes(bs, k, sharpness), codes(bs, k, sharpness)];
      // A one-hot row and a uniform row in the second crop's codes.
      parts[1]!.fill(0, 0, k);
      parts[1]![3 % k] = 1;
      parts[1]!.fill(1 / k, k, 2 * k);
      let entropy = 0;
      const winners = new Set<number>();
      for (const q of parts) {
        for (let r = 0; r < bs; r++) {
          let h = 0;
          let best = 0;
          for (let j = 0; j < k; j++) {
            const p = q[r * k + j]!;
            if (p > 0) h -= p * Math.log(p);
            if (p > q[r * k + best]!) best = j;
          }
          entropy += h / (2 * bs);
          winners.add(best);
        }
      }
      const tensors = parts.map((q) => tf.tensor2d(q, [bs, k]));
      const got = await codeStatistics(tensors);
      tf.dispose(tensors);
      // float32 logs and sums over k terms; the 1e-12 floor adds at most k · 1e-12 · 28 nats.
      assert.ok(
        Math.abs(got.codeEntropy - entropy) < 1e-5 * Math.max(1, entropy),
        `seed ${seed}, [${bs}, ${k}]: entropy ${got.codeEntropy} vs ${entropy}`,
      );
      assert.equal(got.prototypesInUse, winners.size, `seed ${seed}, [${bs}, ${k}]: prototypes in use`);
    }
  });
});
