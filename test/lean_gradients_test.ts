/**
 * leanVariableGrads against tf.variableGrads: the same value and gradients bit
 * for bit (same tape walk, same accumulation order), a lower peak of live
 * tensor bytes, no leaks, and the edge cases of the walk (a gradient function
 * that hands back its dy, outputs off the path to y, unreachable variables).
 */
import * as tf from "@tensorflow/tfjs";
import assert from "node:assert/strict";
import { leanVariableGrads } from "../backend/lean_gradients.ts";
import { withoutGradient } from "../backend/no_gradient.ts";
import { benchRunConfig, parseBenchArgs } from "../bench/bench.ts";
import { disposeModel, makeSwavModel, trainableVariables } from "../models/model.ts";
import { swavTape } from "../pipelines/swav_step.ts";
import { assertNoTensorLeak, useBackend } from "./_helpers.ts";

type Grads = (f: () => tf.Scalar, variables: tf.Variable[]) => { value: tf.Scalar; grads: tf.NamedTensorMap };

const read = async (result: { value: tf.Scalar; grads: tf.NamedTensorMap }) => {
  const value = (await result.value.data())[0]!;
  const grads = Object.fromEntries(
    await Promise.all(Object.entries(result.grads).map(async ([k, g]) => [k, await g.data()] as const)),
  );
  tf.dispose([result.value, ...Object.values(result.grads)]);
  return { value, grads };
};

Deno.test("leanVariableGrads: a SwAV step's gradients equal tf.variableGrads'", async () => {
  await useBackend("wasm");
  const seed = Date.now() % 10000;
  const options = parseBenchArgs(
    ["--width", "8", "--batch", "8", "--crops", "2x16+2x8", "--hidden", "64", "--out", "16"],
  );
  const config = benchRunConfig({ ...options, prototypes: 30 });
  const model = makeSwavModel(config.model, seed);
  const crops = options.crops.map(([n, s], i) =>
    tf.randomNormal([n * options.batch, s, s, 3], 0, 1, "float32", seed + i) as tf.Tensor4D
  );
  const variables = trainableVariables(model);
  const tape = swavTape(model, config, options.batch);
  const loss = () => tf.tidy(() => tape(crops).loss);
  // Same inputs and weights both times (train-mode batch norm uses batch statistics).
  const run = async (grads: Grads) => {
    let peak = 0;
    let out: Awaited<ReturnType<typeof read>> | undefined;
    const info = await tf.profile(async () => {
      out = await read(grads(loss, variables));
    });
    peak = info.peakBytes;
    return { ...out!, peak };
  };
  await assertNoTensorLeak("lean gradients", async () => {
    const standard = await run(tf.variableGrads as Grads);
    const lean = await run(leanVariableGrads as Grads);
    assert.equal(lean.value, standard.value, `seed ${seed}: loss`);
    assert.deepEqual(Object.keys(lean.grads).sort(), Object.keys(standard.grads).sort());
    for (const [name, g] of Object.entries(standard.grads)) {
      assert.deepEqual(lean.grads[name], g, `seed ${seed}: gradient of ${name}`);
    }
    console.log(`peak bytes lean / standard: ${(lean.peak / standard.peak).toFixed(3)}`);
    // Freed as it goes: measured 0.55-0.65 of the standard peak for this model.
    assert.ok(
      lean.peak < 0.8 * standard.peak,
      `peak bytes: lean ${lean.peak} vs standard ${standard.peak}`,
    );
  });
  tf.dispose(crops);
  disposeModel(model);
});

Deno.test("leanVariableGrads: pass-through gradients, side outputs, unreachable variables", async () => {
  await useBackend("wasm");
  await assertNoTensorLeak("edge cases", async () => {
    const variable = (values: number[], name: string) =>
      tf.tidy(() => tf.variable(tf.tensor1d(values), true, name));
    const a = variable([1, -2, 3], "lean_a");
    const b = variable([0.5, 0.25, -1], "lean_b");
    const unused = variable([7], "lean_unused");
    // A custom gradient that returns its dy unchanged (straight-through), used twice.
    const straight = tf.customGrad((...args: (tf.Tensor | tf.GradSaveFunc)[]) => ({
      value: tf.round(args[0] as tf.Tensor),
      gradFunc: (dy: tf.Tensor) => dy,
    }));
    const f = () => {
      const s = straight(tf.mul(a, b)) as tf.Tensor;
      const [left, right] = tf.split(tf.concat([s, tf.mul(a, 3)]), 2); // right half is used, left is too
      tf.exp(b); // a side computation off the path to the value
      return tf.sum(tf.add(tf.mul(left, straight(a) as tf.Tensor), right)) as tf.Scalar;
    };
    const standard = await read(tf.variableGrads(f, [a, b, unused]));
    const lean = await read(leanVariableGrads(f, [a, b, unused]));
    assert.equal(lean.value, standard.value);
    assert.deepEqual(Object.keys(lean.grads).sort(), ["lean_a", "lean_b"]);
    for (const name of ["lean_a", "lean_b"]) assert.deepEqual(lean.grads[name], standard.grads[name], name);
    tf.dispose([a, b, unused]);
  });
});

Deno.test("leanVariableGrads: a withoutGradient output is a constant the walk leaves out", async () => {
  await useBackend("wasm");
  await assertNoTensorLeak("constants", async () => {
    const w = tf.tidy(() =>
      tf.variable(tf.randomNormal([16, 8], 0, 1, "float32", Date.now() % 1000), true, "lean_w")
    );
    const f = () => {
      const s = tf.matMul(w, w, false, true); // [16, 16], depends on w
      const detached = withoutGradient((x) => tf.softmax(tf.mul(x, 3)), [s]);
      const [a, b] = tf.split(tf.concat([detached, detached], 1), 2, 1);
      return tf.sum(tf.mul(s, tf.add(a!, b!))) as tf.Scalar;
    };
    const kernels = async (grads: Grads) => {
      let result: Awaited<ReturnType<typeof read>> | undefined;
      const info = await tf.profile(async () => {
        result = await read(grads(f, [w]));
      });
      return { ...result!, names: info.kernels.map((k) => k.name) };
    };
    const standard = await kernels(tf.variableGrads as Grads);
    const lean = await kernels(leanVariableGrads as Grads);
    assert.equal(lean.value, standard.value);
    assert.deepEqual(lean.grads["lean_w"], standard.grads["lean_w"]);
    // The standard walk runs the split's and concat's gradients (a Concat and a SplitV) back to the
    // detached op, which returns zeros; the lean walk stops at the constant.
    const count = (names: string[], name: string) => names.filter((n) => n === name).length;
    assert.ok(
      count(standard.names, "SplitV") > count(lean.names, "SplitV"),
      "the split of the concat's gradient",
    );
    assert.ok(
      lean.names.length < standard.names.length,
      `${lean.names.length} vs ${standard.names.length} kernels`,
    );
    w.dispose();
  });
});
