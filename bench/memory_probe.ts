/**
 * Memory of the training step over many steps: after each step, the process's
 * RSS, V8's heap (total and used), external memory, the wasm heap and the live
 * tensor bytes. The benchmark configuration of bench/bench.ts.
 *
 *   deno run -A bench/memory_probe.ts [--steps 60] [--threads N] [bench.ts model flags]
 *   deno run -A --v8-flags=--expose-gc bench/memory_probe.ts --gc    # collect every 5 steps
 *
 * Shows whether memory is flat across steps: a wasm heap or tensor count that
 * grows is a leak; RSS that grows while V8's used heap after a collection does
 * not is garbage V8 has not collected yet.
 */
import * as tf from "@tensorflow/tfjs";
import { configureBlas } from "../backend/blas.ts";
import { initBackend } from "../backend/tensor_backend.ts";
import { PROTOTYPES_WEIGHT } from "../models/head.ts";
import { makeSwavModel } from "../models/model.ts";
import { normalisePrototypes } from "../models/prototypes.ts";
import { swavParts } from "../pipelines/pretrain.ts";
import { forwardBackward } from "../pipelines/train_step.ts";
import { LarcSgd } from "../stages/optimise.ts";
import { benchRunConfig, parseBenchArgs } from "./bench.ts";

const stepsAt = Deno.args.indexOf("--steps");
const steps = stepsAt < 0 ? 60 : Number(Deno.args[stepsAt + 1]);
const collect = Deno.args.includes("--gc");
const o = parseBenchArgs(
  Deno.args.filter((a, i, all) => a !== "--gc" && a !== "--steps" && all[i - 1] !== "--steps"),
);
configureBlas({ threads: o.threads, enabled: o.blas });
await initBackend("wasm");
const gc = (globalThis as { gc?: () => void }).gc;
if (collect && gc === undefined) throw new Error("--gc needs --v8-flags=--expose-gc");

const config = benchRunConfig(o);
const model = makeSwavModel(config.model, 1);
const variables = Object.fromEntries(
  model.params.filter((p) => p.trainable).map((p) => [p.name, p.variable]),
);
const variableList = Object.values(variables);
const crops = o.crops.map(([n, s]) =>
  tf.randomNormal([n * o.batch, s, s, 3], 0, 1, "float32", 7 + s) as tf.Tensor4D
);
const optimiser = new LarcSgd({
  momentum: 0.9,
  weightDecay: 1e-6,
  trustCoefficient: 0.001,
  eps: 1e-8,
  clip: false,
});
const parts = swavParts(model, config, o.batch);
const wasmHeapBytes = () =>
  (tf.backend() as unknown as { wasm: { HEAPF32: Float32Array } }).wasm.HEAPF32.buffer.byteLength;
const mb = (bytes: number) => (bytes / 1e6).toFixed(0).padStart(5);

console.log("  step |   rss |  v8 total |  v8 used | external | wasm heap | tensors MB");
for (let i = 0; i < steps; i++) {
  normalisePrototypes(model.param(PROTOTYPES_WEIGHT));
  const tape = forwardBackward(parts, crops, variableList);
  await tape.loss.data();
  const grads: tf.NamedTensorMap = {};
  for (const [name, v] of Object.entries(variables)) {
    const g = tape.grads[v.name];
    if (g !== undefined) grads[name] = g;
  }
  optimiser.step(variables, grads, 0.01);
  tf.dispose([tape.loss, tape.embeddings, ...tape.codes, ...Object.values(tape.grads)]);
  if (collect && i % 5 === 4) gc!();
  const m = Deno.memoryUsage();
  console.log(
    `${String(i).padStart(6)} | ${mb(m.rss)} | ${mb(m.heapTotal).padStart(9)} | ${
      mb(m.heapUsed).padStart(8)
    } | ${mb(m.external).padStart(8)} | ${mb(wasmHeapBytes()).padStart(9)} | ${
      mb(tf.memory().numBytes).padStart(10)
    }`,
  );
}
