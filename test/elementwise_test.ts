/**
 * `addRelu` (a residual block's relu(y + shortcut)) and the oneDNN sum behind TF.js's Add, against a
 * float64 transcription of the definition on fresh random inputs, through oneDNN and through the
 * wasm kernels. Every value is exact: a float32 sum of two float32 values is the float64 sum rounded
 * once (`Math.fround`), and the gradient passes dy or 0, so the tolerance is zero.
 */
import * as tf from "@tensorflow/tfjs";
import assert from "node:assert/strict";
import { addRelu, NATIVE_ADD_MIN_SIZE, nativeElementwiseActive } from "../backend/elementwise_kernels.ts";
import { initBackend, withKernelSettings } from "../backend/tensor_backend.ts";
import { assertNoTensorLeak } from "./_helpers.ts";
import { optionalTest } from "./_optional.ts";

const randomArray = (n: number): Float32Array =>
  Float32Array.from({ length: n }, () => Math.random() * 4 - 2);

const randomShape = (): number[] => {
  const r = (lo: number, hi: number) => lo + Math.floor(Math.random() * (hi - lo + 1));
  return [r(1, 9), r(1, 17), r(1, 17), r(1, 40)];
};

/** relu(a + b) and, for the loss Σ relu(a + b)·w, its gradient (the same for a and b), in float64. */
const reference = (a: Float32Array, b: Float32Array, w: Float32Array) => {
  const y = new Float64Array(a.length);
  const grad = new Float64Array(a.length);
  for (let i = 0; i < a.length; i++) {
    const sum = Math.fround(a[i]! + b[i]!);
    y[i] = sum > 0 ? sum : 0;
    grad[i] = sum > 0 ? w[i]! : 0;
  }
  return { y, grad };
};

/** addRelu's value and the gradients of Σ addRelu(a, b)·w with respect to a and b. */
const run = async (shape: number[], a: Float32Array, b: Float32Array, w: Float32Array) => {
  const [ta, tb, tw] = [tf.tensor(a, shape), tf.tensor(b, shape), tf.tensor(w, shape)];
  const [y, [da, db]] = tf.tidy(() => {
    const y = addRelu(ta, tb);
    const [da, db] = tf.grads((x: tf.Tensor, z: tf.Tensor) => tf.sum(tf.mul(addRelu(x, z), tw)))([ta, tb]);
    return [y, [da!, db!]] as const;
  });
  const out = { y: await y.data(), da: await da.data(), db: await db.data() };
  tf.dispose([ta, tb, tw, y, da, db]);
  return out;
};

const assertExact = (label: string, got: ArrayLike<number>, want: ArrayLike<number>) => {
  assert.equal(got.length, want.length, `${label}: length`);
  for (let i = 0; i < want.length; i++) {
    if (got[i] !== want[i]) assert.fail(`${label}[${i}]: ${got[i]} != ${want[i]}`);
  }
};

const matchesReference = async (t: Deno.TestContext, native: boolean) => {
  await initBackend("wasm");
  // A ResNet stage's activations (past the sum's native threshold) and fresh odd shapes.
  for (const shape of [[4, 16, 16, 32], randomShape(), randomShape(), [3, 5, 7, 11]]) {
    await t.step(`${native ? "oneDNN" : "wasm kernels"} [${shape}]`, async () => {
      const size = shape.reduce((p, q) => p * q, 1);
      const [a, b, w] = [randomArray(size), randomArray(size), randomArray(size)];
      const ref = reference(a, b, w);
      const got = await withKernelSettings({ nativeElementwise: native }, () => {
        assert.equal(nativeElementwiseActive(), native, "native element-wise kernels active");
        return assertNoTensorLeak("addRelu", () => run(shape, a, b, w));
      });
      assertExact("relu(a + b)", got.y, ref.y);
      assertExact("d/da", got.da, ref.grad);
      assertExact("d/db", got.db, ref.grad);
    });
  }
};

optionalTest("addRelu through oneDNN: exact value and gradient against float64", [
  "openblas",
  "onednn",
], (t) => matchesReference(t, true));

Deno.test("addRelu on the wasm kernels: exact value and gradient against float64", (t) =>
  matchesReference(t, false));

optionalTest("Add on wasm: oneDNN for large same-shape sums, the wasm kernel otherwise, exact both ways", [
  "openblas",
  "onednn",
], async () => {
  await initBackend("wasm");
  assert.equal(nativeElementwiseActive(), true);
  // Large and same-shape (oneDNN), small (wasm), broadcast (wasm), and a gradient sum on the tape.
  const large = [2, NATIVE_ADD_MIN_SIZE / 2 + 7];
  for (const [shapeA, shapeB] of [[large, large], [[3, 5], [3, 5]], [large, [large[1]!]]]) {
    const a = randomArray(shapeA!.reduce((p, q) => p * q, 1));
    const b = randomArray(shapeB!.reduce((p, q) => p * q, 1));
    const got = await assertNoTensorLeak("add", async () => {
      const [ta, tb] = [tf.tensor(a, shapeA), tf.tensor(b, shapeB)];
      const sum = tf.add(ta, tb);
      const data = await sum.data();
      tf.dispose([ta, tb, sum]);
      return data;
    });
    const want = Float64Array.from(a, (v, i) => Math.fround(v + b[i % b.length]!));
    assertExact(`add [${shapeA}] + [${shapeB}]`, got, want);
  }
  // A tensor used twice: the tape sums its two gradients (x·u and x·v give u + v).
  const [x, u, v] = [
    randomArray(large[0]! * large[1]!),
    randomArray(large[0]! * large[1]!),
    randomArray(large[0]! * large[1]!),
  ];
  const dx = await assertNoTensorLeak("gradient sum", async () => {
    const [tx, tu, tv] = [tf.tensor(x, large), tf.tensor(u, large), tf.tensor(v, large)];
    const g = tf.grad((z: tf.Tensor) => tf.add(tf.sum(tf.mul(z, tu)), tf.sum(tf.mul(z, tv))))(tx);
    const data = await g.data();
    tf.dispose([tx, tu, tv, g]);
    return data;
  });
  assertExact("gradient of a tensor used twice", dx, Float64Array.from(u, (p, i) => Math.fround(p + v[i]!)));
});

// Through oneDNN where it loads, else on the wasm kernels.
Deno.test("addRelu's live tensor count stays flat over repeated training-style calls", async () => {
  await initBackend("wasm");
  const shape = [2, 8, 8, 16];
  const [a, b] = [tf.variable(tf.randomNormal(shape)), tf.variable(tf.randomNormal(shape))];
  const step = () => {
    const { value, grads } = tf.variableGrads(() => tf.sum(tf.square(addRelu(a, b))) as tf.Scalar);
    tf.dispose([value, ...Object.values(grads)]);
  };
  step();
  await assertNoTensorLeak("20 steps", () => {
    for (let i = 0; i < 20; i++) step();
  });
  tf.dispose([a, b]);
});
