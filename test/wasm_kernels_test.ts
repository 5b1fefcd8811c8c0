/**
 * The wasm Conv2DBackpropInput replacement (polyphase forward convolution on
 * XNNPACK) against the cpu backend and a float64 transcription of the
 * definition, on fresh random inputs.
 */
import * as tf from "@tensorflow/tfjs";
import assert from "node:assert/strict";
import { initBackend, withKernelSettings } from "../backend/tensor_backend.ts";
import { planInputGradAxis } from "../backend/wasm_kernels.ts";
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

const randomArray = (n: number): Float32Array => {
  const a = new Float32Array(n);
  for (let i = 0; i < n; i++) a[i] = Math.random() * 2 - 1;
  return a;
};

const randomInt = (lo: number, hi: number): number => lo + Math.floor(Math.random() * (hi - lo + 1));

/** Forward output shape and near-side padding, as TF.js computes them. */
const geometry = (c: ConvCase) => {
  const info = tf.backend_util.computeConv2DInfo(
    [c.batch, c.height, c.width, c.inChannels],
    [c.kernel, c.kernel, c.inChannels, c.outChannels],
    c.stride,
    1,
    c.pad,
  );
  return { outH: info.outHeight, outW: info.outWidth, top: info.padInfo.top, left: info.padInfo.left };
};

/** dx[n, ih, iw, ci] = Σ dy[n, oh, ow, co] · W[kh, kw, ci, co] over oh·s + kh − top = ih (float64). */
const inputGradientReference = (c: ConvCase, dy: Float32Array, w: Float32Array): Float64Array => {
  const { outH, outW, top, left } = geometry(c);
  const k = c.kernel;
  const dx = new Float64Array(c.batch * c.height * c.width * c.inChannels);
  for (let n = 0; n < c.batch; n++) {
    for (let oh = 0; oh < outH; oh++) {
      for (let ow = 0; ow < outW; ow++) {
        for (let kh = 0; kh < k; kh++) {
          const ih = oh * c.stride + kh - top;
          if (ih < 0 || ih >= c.height) continue;
          for (let kw = 0; kw < k; kw++) {
            const iw = ow * c.stride + kw - left;
            if (iw < 0 || iw >= c.width) continue;
            for (let ci = 0; ci < c.inChannels; ci++) {
              let sum = 0;
              for (let co = 0; co < c.outChannels; co++) {
                sum += dy[((n * outH + oh) * outW + ow) * c.outChannels + co]! *
                  w[((kh * k + kw) * c.inChannels + ci) * c.outChannels + co]!;
              }
              dx[((n * c.height + ih) * c.width + iw) * c.inChannels + ci] += sum;
            }
          }
        }
      }
    }
  }
  return dx;
};

/** dx on the active backend: the gradient of sum(conv2d(x, W) · dy) with respect to x. */
const inputGradient = async (c: ConvCase, dy: Float32Array, w: Float32Array): Promise<Float32Array> => {
  const { outH, outW } = geometry(c);
  const wt = tf.tensor4d(w, [c.kernel, c.kernel, c.inChannels, c.outChannels]);
  const dyt = tf.tensor4d(dy, [c.batch, outH, outW, c.outChannels]);
  const xt = tf.zeros([c.batch, c.height, c.width, c.inChannels]) as tf.Tensor4D;
  const g = tf.grad((x) => tf.conv2d(x as tf.Tensor4D, wt, c.stride, c.pad).mul(dyt).sum())(xt);
  const out = (await g.data()) as Float32Array;
  tf.dispose([wt, dyt, xt, g]);
  return out;
};

const describe = (c: ConvCase) =>
  `k${c.kernel} s${c.stride} ${
    JSON.stringify(c.pad)
  } ${c.batch}x${c.height}x${c.width}x${c.inChannels}<-${c.outChannels}`;

Deno.test("planInputGradAxis: every (input row, filter row) pair is covered exactly once", () => {
  // Independent of any backend: enumerate the rows each plan reads and compare with the definition.
  for (let filter = 1; filter <= 7; filter++) {
    for (let stride = 1; stride <= 3; stride++) {
      for (let pad = 0; pad <= filter; pad++) {
        for (let inSize = Math.max(1, filter - 2 * pad); inSize <= 12; inSize++) {
          const outSize = Math.floor((inSize + 2 * pad - filter) / stride) + 1;
          if (outSize < 1) continue;
          const plan = planInputGradAxis(inSize, outSize, filter, stride, pad);
          assert.equal(plan.outPerPhase, Math.ceil(inSize / stride));
          // Rows the plan's convolution produces, including the ones cropped off.
          assert.equal(plan.near + outSize + plan.far - plan.taps + 1, plan.outPerPhase);
          for (let i = 0; i < inSize; i++) {
            const expected = new Set<string>();
            for (let o = 0; o < outSize; o++) {
              const k = i + pad - o * stride;
              if (k >= 0 && k < filter) expected.add(`${o}:${k}`);
            }
            const got = new Set<string>();
            const p = i % stride;
            const a = (i - p) / stride;
            for (let t = 0; t < plan.taps; t++) {
              const k = plan.tapIndex[p]![t]!;
              const o = a - plan.near + t;
              if (k >= 0 && o >= 0 && o < outSize) got.add(`${o}:${k}`);
            }
            assert.deepEqual(
              got,
              expected,
              `filter ${filter} stride ${stride} pad ${pad} in ${inSize} row ${i}`,
            );
          }
        }
      }
    }
  }
});

Deno.test("wasm Conv2DBackpropInput matches the cpu backend and the float64 definition", async (t) => {
  const cases: ConvCase[] = [];
  for (const kernel of [1, 3, 7]) {
    for (const stride of [1, 2]) {
      const pads: Pad[] = ["same", "valid", [[0, 0], [kernel >> 1, kernel >> 1], [kernel >> 1, kernel >> 1], [
        0,
        0,
      ]]];
      for (const pad of pads) {
        cases.push({
          batch: randomInt(1, 3),
          height: randomInt(kernel, kernel + 6), // odd and even sizes
          width: randomInt(kernel, kernel + 6),
          inChannels: randomInt(1, 5),
          outChannels: randomInt(1, 6),
          kernel,
          stride,
          pad,
        });
      }
    }
  }
  // The ResNet's shapes: batch 1, odd sizes, stride 3, wide channels.
  cases.push({
    batch: 1,
    height: 9,
    width: 11,
    inChannels: 16,
    outChannels: 32,
    kernel: 3,
    stride: 2,
    pad: [[0, 0], [1, 1], [1, 1], [0, 0]],
  });
  cases.push({
    batch: 1,
    height: 13,
    width: 13,
    inChannels: 3,
    outChannels: 8,
    kernel: 7,
    stride: 2,
    pad: [[0, 0], [3, 3], [3, 3], [0, 0]],
  });
  cases.push({
    batch: 2,
    height: 10,
    width: 11,
    inChannels: 4,
    outChannels: 3,
    kernel: 3,
    stride: 3,
    pad: "same",
  });
  cases.push({
    batch: 1,
    height: 8,
    width: 8,
    inChannels: 8,
    outChannels: 16,
    kernel: 1,
    stride: 2,
    pad: "valid",
  });
  // Padding beyond a 1x1 filter's reach on a stride-3 axis: the output never reads x's one column
  // (dx is zero there); the sub-filter plan would need negative padding and must fall back.
  cases.push({
    batch: 1,
    height: 5,
    width: 1,
    inChannels: 3,
    outChannels: 2,
    kernel: 1,
    stride: 3,
    pad: [[0, 0], [1, 1], [1, 1], [0, 0]],
  });

  // These cases are about the wasm-only kernels: keep native (BLAS / oneDNN) kernels out of the way.
  const wasmOnly = { blasConv2DBackpropInput: false };
  for (const c of cases) {
    await t.step(describe(c), async () => {
      const { outH, outW } = geometry(c);
      const dy = randomArray(c.batch * outH * outW * c.outChannels);
      const w = randomArray(c.kernel * c.kernel * c.inChannels * c.outChannels);
      await initBackend("cpu");
      const cpu = await inputGradient(c, dy, w);
      await initBackend("wasm");
      const wasm = await withKernelSettings(
        wasmOnly,
        () => assertNoTensorLeak("wasm input gradient", () => inputGradient(c, dy, w)),
      );
      const reference = inputGradientReference(c, dy, w);
      // Tolerance: float32 sums of at most a few hundred terms against float64 / another float32 order.
      assert.ok(relativeError(wasm, reference) < 1e-5, `wasm vs float64 ${relativeError(wasm, reference)}`);
      assert.ok(relativeError(wasm, cpu) < 1e-5, `wasm vs cpu ${relativeError(wasm, cpu)}`);
      // The tfjs-backend-wasm kernel it replaces agrees too (guards the fallback path).
      const native = await withKernelSettings(
        { ...wasmOnly, fastConv2DBackpropInput: false },
        () => inputGradient(c, dy, w),
      );
      assert.ok(
        relativeError(native, reference) < 1e-5,
        `native vs float64 ${relativeError(native, reference)}`,
      );
    });
  }
});

Deno.test("wasm Conv2DBackpropInput frees every intermediate buffer on the wasm heap", async () => {
  await initBackend("wasm");
  // Engine-level leak checks cannot see kernel temporaries: count the backend's buffers.
  const backend = tf.engine().backend as unknown as { numDataIds(): number };
  const dy = tf.randomNormal([2, 5, 5, 4]) as tf.Tensor4D;
  const w = tf.randomNormal([3, 3, 3, 4]) as tf.Tensor4D;
  const run = () =>
    tf.dispose([
      tf.conv2dTranspose(dy, w, [2, 9, 9, 3], 2, [[0, 0], [1, 1], [1, 1], [0, 0]]),
      tf.conv2dTranspose(dy, w, [2, 10, 10, 3], 2, "same"),
      tf.conv2dTranspose(dy, w, [2, 5, 5, 3], 1, "same"),
    ]);
  run();
  const before = backend.numDataIds();
  for (let i = 0; i < 5; i++) run();
  assert.equal(backend.numDataIds(), before);
  tf.dispose([dy, w]);
});

Deno.test("wasm Conv2DBackpropFilter is 0 where every filter tap falls in the padding (was an XNNPACK error)", async () => {
  await initBackend("wasm");
  // Width 1 with padding 1 and stride 3: the 1x1 filter only ever meets the left padding along the width,
  // so its gradient is 0; the swapped convolution used to get an empty input and return garbage.
  const cases: Array<{ x: [number, number, number, number]; co: number; stride: number; pad: number }> = [
    { x: [2, 3, 1, 9], co: 5, stride: 3, pad: 1 },
    { x: [1, 1, 4, 3], co: 2, stride: 2, pad: 1 },
  ];
  for (const { x: shape, co, stride, pad } of cases) {
    await assertNoTensorLeak(`filter gradient ${shape}`, async () => {
      const gradient = async () => {
        // Freed buffers full of non-zeros: an output that is never written then shows up as wrong.
        for (let size = 1; size <= 1 << 12; size *= 2) tf.fill([size], 7).dispose();
        const [x, filter, dy] = tf.tidy(() => {
          const x = tf.randomNormal(shape, 0, 1, "float32", 1) as tf.Tensor4D;
          const filter = tf.randomNormal([1, 1, shape[3], co], 0, 1, "float32", 2) as tf.Tensor4D;
          const dy = tf.randomNormal(tf.conv2d(x, filter, stride, pad).shape, 0, 1, "float32", 3);
          return [x, filter, dy];
        });
        const g = tf.grad((f: tf.Tensor) => tf.sum(tf.mul(tf.conv2d(x, f as tf.Tensor4D, stride, pad), dy)))(
          filter,
        );
        const values = Float64Array.from(await g.data());
        tf.dispose([x, filter, dy, g]);
        return values;
      };
      const wasm = await withKernelSettings({ blas: false }, gradient);
      await tf.setBackend("cpu");
      const cpu = await gradient();
      await tf.setBackend("wasm");
      assert.ok(
        relativeError(wasm, cpu) < 1e-5,
        `x [${shape}] stride ${stride} pad ${pad}: ${relativeError(wasm, cpu)}`,
      );
    });
  }
});
