// Times sinkhornKnopp on wasm: [64, 3000] scores in [-1, 1], eps 0.05, 3 iterations,
// host path ("auto") vs log-domain tensor path ("tensor"), median of 20 runs each.
// "cold" is the first 20 calls of the process (V8 still tiering up the host loops),
// "warm" 20 calls after 100 more (steady state, as in training).
//   deno run -A bench/sinkhorn_bench.ts
import * as tf from "@tensorflow/tfjs";
import { initBackend } from "../backend/tensor_backend.ts";
import { type ComputePath, sinkhornKnopp } from "../stages/sinkhorn.ts";

await initBackend("wasm");
const scores = tf.randomUniform([64, 3000], -1, 1, "float32", 1) as tf.Tensor2D;
const options = { epsilon: 0.05, iterations: 3 };

const times = (path: ComputePath, runs: number): number[] => {
  const out: number[] = [];
  for (let i = 0; i < runs; i++) {
    const t0 = performance.now();
    const codes = sinkhornKnopp(scores, options, path);
    codes.dataSync(); // wait for the result
    out.push(performance.now() - t0);
    codes.dispose();
  }
  return out;
};
const median = (xs: number[]): number => {
  const s = [...xs].sort((a, b) => a - b);
  return (s[(s.length - 1) >> 1]! + s[s.length >> 1]!) / 2;
};
const fmt = (xs: number[]) => `${median(xs).toFixed(2)} ms`;

console.log(`backend ${tf.getBackend()}, [64, 3000], eps 0.05, 3 iterations, median of 20`);
console.log(`cold  host ${fmt(times("auto", 20))}  tensor ${fmt(times("tensor", 20))}`);
times("auto", 100);
times("tensor", 20);
for (let round = 0; round < 5; round++) {
  console.log(`warm  host ${fmt(times("auto", 20))}  tensor ${fmt(times("tensor", 20))}`);
}
scores.dispose();
