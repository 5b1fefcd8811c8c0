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
import { Effect, ManagedRuntime } from "effect";
import { TensorBackend } from "../backend/tensor_backend.ts";
import { heapBuffer, type WasmBackendLike } from "../backend/wasm_heap.ts";
import { swavTape } from "../pipelines/swav_step.ts";
import { makeFixture, parseBenchArgs, trainStep } from "./bench.ts";

const stepsAt = Deno.args.indexOf("--steps");
const steps = stepsAt < 0 ? 60 : Number(Deno.args[stepsAt + 1]);
const collect = Deno.args.includes("--gc");
const o = parseBenchArgs(
  Deno.args.filter((a, i, all) => a !== "--gc" && a !== "--steps" && all[i - 1] !== "--steps"),
);
// The backend and its kernel settings for the whole probe (held until the process exits).
await ManagedRuntime.make(TensorBackend.layer("wasm", { threads: o.threads, blas: o.blas })).runPromise(
  Effect.service(TensorBackend),
);
const gc = (globalThis as { gc?: () => void }).gc;
if (collect && gc === undefined) throw new Error("--gc needs --v8-flags=--expose-gc");

const fixture = makeFixture(o);
const parts = swavTape(fixture.model, fixture.config, o.batch);
const wasmHeapBytes = () => heapBuffer(tf.backend() as unknown as WasmBackendLike).byteLength;
const mb = (bytes: number) => (bytes / 1e6).toFixed(0).padStart(5);

console.log("  step |   rss |  v8 total |  v8 used | external | wasm heap | tensors MB");
for (let i = 0; i < steps; i++) {
  await trainStep(fixture, parts);
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
fixture.dispose();
