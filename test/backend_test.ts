import * as tf from "@tensorflow/tfjs";
import assert from "node:assert/strict";
import { Effect, Exit } from "effect";
import { BackendUnavailable, initBackend, probeWebGpu, TensorBackend } from "../backend/tensor_backend.ts";
import { assertNoTensorLeak, relativeError } from "./_helpers.ts";

type Pad = "same" | "valid" | [[number, number], [number, number], [number, number], [number, number]];

interface ConvCase {
  readonly batch: number;
  readonly height: number;
  readonly width: number;
  readonly inChannels: number;
  readonly outChannels: number;
  readonly kernel: number;
  readonly stride: number;
  readonly pad: Pad;
}

/** Filter gradient of sum(conv2d(x, w) * r) on the active backend, with the inputs given as arrays. */
const filterGradient = async (
  c: ConvCase,
  x: Float32Array,
  w: Float32Array,
  r: (outShape: number[]) => Float32Array,
): Promise<{ grad: Float32Array; outShape: number[] }> => {
  const xt = tf.tensor4d(x, [c.batch, c.height, c.width, c.inChannels]);
  const wt = tf.tensor4d(w, [c.kernel, c.kernel, c.inChannels, c.outChannels]);
  const outShape = tf.tidy(() => tf.conv2d(xt, wt, c.stride, c.pad).shape);
  const rt = tf.tensor(r(outShape), outShape);
  const g = tf.grad((f) => tf.conv2d(xt, f as tf.Tensor4D, c.stride, c.pad).mul(rt).sum())(wt);
  const grad = (await g.data()) as Float32Array;
  tf.dispose([xt, wt, rt, g]);
  return { grad, outShape };
};

/** The same gradient from its definition, in float64: Σ x[n, oh·s + kh − top, ...] · r[n, oh, ow, co]. */
const filterGradientReference = (
  c: ConvCase,
  x: Float32Array,
  r: Float32Array,
  outShape: number[],
): Float64Array => {
  const [, outH, outW] = outShape as [number, number, number, number];
  let top: number;
  let left: number;
  if (c.pad === "valid") {
    top = 0;
    left = 0;
  } else if (c.pad === "same") {
    // TF's SAME: total padding split with the extra pixel at the bottom/right.
    top = Math.floor(Math.max((outH - 1) * c.stride + c.kernel - c.height, 0) / 2);
    left = Math.floor(Math.max((outW - 1) * c.stride + c.kernel - c.width, 0) / 2);
  } else {
    top = c.pad[1][0];
    left = c.pad[2][0];
  }
  const out = new Float64Array(c.kernel * c.kernel * c.inChannels * c.outChannels);
  for (let kh = 0; kh < c.kernel; kh++) {
    for (let kw = 0; kw < c.kernel; kw++) {
      for (let ci = 0; ci < c.inChannels; ci++) {
        for (let co = 0; co < c.outChannels; co++) {
          let sum = 0;
          for (let n = 0; n < c.batch; n++) {
            for (let oh = 0; oh < outH; oh++) {
              const ih = oh * c.stride + kh - top;
              if (ih < 0 || ih >= c.height) continue;
              for (let ow = 0; ow < outW; ow++) {
                const iw = ow * c.stride + kw - left;
                if (iw < 0 || iw >= c.width) continue;
                sum += x[((n * c.height + ih) * c.width + iw) * c.inChannels + ci]! *
                  r[((n * outH + oh) * outW + ow) * c.outChannels + co]!;
              }
            }
          }
          out[((kh * c.kernel + kw) * c.inChannels + ci) * c.outChannels + co] = sum;
        }
      }
    }
  }
  return out;
};

const randomArray = (n: number): Float32Array => {
  const a = new Float32Array(n);
  for (let i = 0; i < n; i++) a[i] = Math.random() * 2 - 1;
  return a;
};

Deno.test("wasm Conv2DBackpropFilter matches the cpu backend and the definition", async (t) => {
  const cases: ConvCase[] = [];
  for (const kernel of [1, 3, 7]) {
    for (const stride of [1, 2]) {
      for (const pad of ["same", "valid"] as const) {
        cases.push({
          batch: 1 + Math.floor(Math.random() * 3),
          height: 9 + Math.floor(Math.random() * 6), // odd and even sizes, at least the 7x7 kernel
          width: 9 + Math.floor(Math.random() * 6),
          inChannels: 1 + Math.floor(Math.random() * 4),
          outChannels: 1 + Math.floor(Math.random() * 5),
          kernel,
          stride,
          pad,
        });
      }
    }
  }
  // Explicit symmetric padding as the ResNet convolutions use (torch semantics).
  cases.push({
    batch: 2,
    height: 11,
    width: 10,
    inChannels: 3,
    outChannels: 4,
    kernel: 3,
    stride: 2,
    pad: [[0, 0], [1, 1], [1, 1], [0, 0]],
  });
  cases.push({
    batch: 2,
    height: 15,
    width: 13,
    inChannels: 3,
    outChannels: 2,
    kernel: 7,
    stride: 2,
    pad: [[0, 0], [3, 3], [3, 3], [0, 0]],
  });

  for (const c of cases) {
    await t.step(
      `k${c.kernel} s${c.stride} ${
        JSON.stringify(c.pad)
      } ${c.batch}x${c.height}x${c.width}x${c.inChannels}->${c.outChannels}`,
      async () => {
        const x = randomArray(c.batch * c.height * c.width * c.inChannels);
        const w = randomArray(c.kernel * c.kernel * c.inChannels * c.outChannels);
        let r: Float32Array | undefined;
        const makeR = (shape: number[]) => (r ??= randomArray(shape.reduce((a, b) => a * b, 1)));
        await initBackend("cpu");
        const cpu = await filterGradient(c, x, w, makeR);
        await initBackend("wasm");
        const wasm = await assertNoTensorLeak("wasm filter gradient", () => filterGradient(c, x, w, makeR));
        assert.deepEqual(wasm.outShape, cpu.outShape);
        const reference = filterGradientReference(c, x, r!, cpu.outShape);
        // Tolerance: float32 sums of at most a few hundred terms against float64.
        assert.ok(
          relativeError(wasm.grad, cpu.grad) < 1e-5,
          `wasm vs cpu ${relativeError(wasm.grad, cpu.grad)}`,
        );
        assert.ok(
          relativeError(wasm.grad, reference) < 1e-5,
          `wasm vs float64 ${relativeError(wasm.grad, reference)}`,
        );
      },
    );
  }
});

Deno.test("a small convolutional model trains on wasm: loss falls, no tensor leak", async () => {
  await initBackend("wasm");
  // Two classes of 12x12 images: horizontal or vertical stripes, under noise.
  const images: tf.Tensor4D = tf.tidy(() => {
    const stripe = tf.tensor1d(Array.from({ length: 12 }, (_, i) => i % 2));
    const horizontal = stripe.reshape([1, 12, 1, 1]).tile([16, 1, 12, 1]);
    const vertical = stripe.reshape([1, 1, 12, 1]).tile([16, 12, 1, 1]);
    return tf.concat([horizontal, vertical]).add(
      tf.randomUniform([32, 12, 12, 1], 0, 0.5, "float32", 11),
    ) as tf.Tensor4D;
  });
  const labels = tf.oneHot(tf.concat([tf.zeros([16], "int32"), tf.ones([16], "int32")]), 2);
  const w1 = tf.variable(tf.randomNormal([3, 3, 1, 4], 0, 0.5, "float32", 12)) as tf.Variable<tf.Rank.R4>;
  const w2 = tf.variable(tf.randomNormal([3, 3, 4, 4], 0, 0.3, "float32", 13)) as tf.Variable<tf.Rank.R4>;
  const dense = tf.variable(tf.randomNormal([4, 2], 0, 0.5, "float32", 14));
  const optimizer = tf.train.sgd(0.5);
  const lossOf = () =>
    tf.tidy(() => {
      const h1 = tf.relu(tf.conv2d(images, w1, 1, "same"));
      const h2 = tf.relu(tf.conv2d(h1 as tf.Tensor4D, w2, 2, "same"));
      const logits = h2.mean([1, 2]).matMul(dense);
      return tf.losses.softmaxCrossEntropy(labels, logits) as tf.Scalar;
    });
  const losses: number[] = [];
  await assertNoTensorLeak("training loop", async () => {
    for (let step = 0; step < 60; step++) {
      const loss = optimizer.minimize(lossOf, true)!;
      losses.push((await loss.data())[0]!);
      loss.dispose();
    }
  });
  assert.ok(losses.every(Number.isFinite), `non-finite loss: ${losses}`);
  assert.ok(losses.at(-1)! < losses[0]! * 0.7, `loss did not fall: ${losses[0]} -> ${losses.at(-1)}`);
  optimizer.dispose();
  tf.dispose([images, labels, w1, w2, dense]);
});

Deno.test("the tensorflow backend fails with a typed error where tfjs-node is not installed", async () => {
  const exit = await Effect.runPromiseExit(
    Effect.scoped(Layer_build_tensorflow()),
  );
  assert.ok(Exit.isFailure(exit), "expected a failure");
  const error = exit.cause.toString();
  assert.match(error, /BackendUnavailable/);
  assert.match(error, /tensorflow/);
  assert.match(error, /wasm/);
  await initBackend("wasm");
});

const Layer_build_tensorflow = () =>
  Effect.gen(function* () {
    const backend = yield* TensorBackend;
    return backend.name;
  }).pipe(Effect.provide(TensorBackend.layer("tensorflow")));

Deno.test("auto chooses wasm where WebGPU has no adapter or only a fallback one", async () => {
  const adapter = await probeWebGpu();
  const name = await Effect.runPromise(
    Effect.scoped(
      Effect.gen(function* () {
        return (yield* TensorBackend).name;
      }).pipe(Effect.provide(TensorBackend.layer("auto"))),
    ),
  );
  assert.equal(name, adapter !== null && !adapter.fallback ? "webgpu" : "wasm");
});

Deno.test("BackendUnavailable names the alternatives", () => {
  const error = new BackendUnavailable({
    backend: "tensorflow",
    reason: "missing",
    alternatives: ["wasm", "webgpu"],
  });
  assert.equal(error._tag, "BackendUnavailable");
  assert.match(error.message, /wasm, webgpu/);
});
