/**
 * The epoch-start k-means of DeepCluster-v2 alone (pipelines/deepclusterv2.ts `clusterMemory`): a bank of
 * N random unit rows of D dims, heads of K clusters each, 10 update steps + a final assignment, timed.
 * Defaults: Fashion-MNIST's training bank at batch 256 (234 batches = 59904 samples), D 128, 3 heads of
 * 100 (the small-data default K, 10x the classes), 2 assignment crops.
 *
 *   npx deno run -A bench/kmeans_bench.ts [--n 59904] [--dim 128] [--k 100] [--heads 3]
 */
import { Effect } from "effect";
import { initBackend } from "../backend/tensor_backend.ts";
import { rngFor } from "../data/rng.ts";
import { clusterMemory, startRows } from "../pipelines/deepclusterv2.ts";
import { makeMemoryBank, writeCrop } from "../state/memory_bank.ts";

const arg = (name: string, fallback: number): number => {
  const i = Deno.args.indexOf(name);
  return i < 0 ? fallback : Number(Deno.args[i + 1]);
};

if (import.meta.main) {
  await initBackend("wasm");
  const n = arg("--n", 59904);
  const dim = arg("--dim", 128);
  const k = arg("--k", 100);
  const heads = arg("--heads", 3);
  const bank = makeMemoryBank({ size: n, dim, crops: 2, heads });
  const rng = rngFor(1, 2, 3);
  const ids = Int32Array.from({ length: n }, (_, i) => i);
  for (let crop = 0; crop < 2; crop++) {
    const rows = new Float32Array(n * dim);
    for (let r = 0; r < n; r++) {
      let ss = 0;
      for (let j = 0; j < dim; j++) ss += (rows[r * dim + j] = rng.uniform(-1, 1)) ** 2;
      for (let j = 0; j < dim; j++) rows[r * dim + j]! /= Math.sqrt(ss);
    }
    writeCrop(bank, crop, ids, rows);
  }
  const t0 = performance.now();
  await Effect.runPromise(
    clusterMemory(bank, Array(heads).fill(k), 10, (h, count, kk) => startRows(count, kk, 1, 0, h)),
  );
  const seconds = (performance.now() - t0) / 1000;
  console.log(JSON.stringify({ stage: "kmeans", n, dim, k, heads, seconds: Number(seconds.toFixed(3)) }));
}
