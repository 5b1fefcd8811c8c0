/** Shared test helpers: backend set-up, leak checks, tolerances. */
import type * as tf from "@tensorflow/tfjs";
import assert from "node:assert/strict";
import { liveTensors } from "../backend/resources.ts";

/**
 * Runs `block` and asserts that the live tensor count returns to its value
 * before the block: every tensor the block made was disposed.
 */
export const assertNoTensorLeak = async <T>(label: string, block: () => T | Promise<T>): Promise<T> => {
  const before = liveTensors();
  const result = await block();
  const after = liveTensors();
  assert.equal(
    after.tensors,
    before.tensors,
    `${label}: live tensors went from ${before.tensors} to ${after.tensors}`,
  );
  return result;
};

/** Norm-wise relative error ‖got − ref‖ / ‖ref‖, computed in float64. */
export const relativeError = (got: ArrayLike<number>, ref: ArrayLike<number>): number => {
  assert.equal(got.length, ref.length, `length ${got.length} != ${ref.length}`);
  let diff = 0;
  let norm = 0;
  for (let i = 0; i < ref.length; i++) {
    const d = got[i]! - ref[i]!;
    diff += d * d;
    norm += ref[i]! * ref[i]!;
  }
  return norm === 0 ? Math.sqrt(diff) : Math.sqrt(diff / norm);
};

/** Reads a tensor's values as float64 (asynchronously: works on every backend). */
export const values = async (t: tf.Tensor): Promise<Float64Array> => Float64Array.from(await t.data());

/** Makes `name` the active backend for a test file (wasm gets its extra kernels). */
export const useBackend = async (name: "wasm" | "cpu" | "webgpu" = "wasm"): Promise<void> => {
  const { initBackend } = await import("../backend/tensor_backend.ts");
  await initBackend(name);
};

/** The command line's entry point (`deno task pretrain|eval|...` run it). */
export const cliPath = new URL("../cli/main.ts", import.meta.url).pathname;

/**
 * Runs `deno run --allow-all cli/main.ts ...args` to its end on the wasm backend
 * (2 native threads unless `env` says otherwise); its exit code and output.
 */
export const runCli = async (args: readonly string[], env: Record<string, string> = {}) => {
  const output = await new Deno.Command(Deno.execPath(), {
    args: ["run", "--allow-all", cliPath, ...args],
    env: { NO_COLOR: "1", SWAV_BACKEND: "wasm", SWAV_THREADS: "2", ...env },
    stdout: "piped",
    stderr: "piped",
  }).output();
  return {
    code: output.code,
    stdout: new TextDecoder().decode(output.stdout),
    stderr: new TextDecoder().decode(output.stderr),
  };
};
