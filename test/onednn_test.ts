/**
 * oneDNN convolutions (backend/onednn.ts) on the shapes its jit 1x1 filter
 * gradient gets wrong: a strided 1x1 convolution with fewer input channels
 * than its channel block overruns a scratchpad (glibc aborts the process at
 * one thread; at two the threads overwrite each other's copy of x and the
 * gradient differs run to run). Those must take the OpenBLAS path: exact and
 * repeatable at two and one threads. Skipped where oneDNN or OpenBLAS is absent.
 */
import * as tf from "@tensorflow/tfjs";
import assert from "node:assert/strict";
import { optionalTest } from "./_optional.ts";
import { type DnnlConvShape, overrunsScratchpad } from "../backend/onednn.ts";
import { withKernelSettings } from "../backend/tensor_backend.ts";
import { relativeError, useBackend } from "./_helpers.ts";

/** A 1x1 convolution of x [N, 8, 8, ci] to 8 channels at `stride`, unpadded. */
const pointwise = (ci: number, stride: number): DnnlConvShape => {
  const out = Math.ceil(8 / stride);
  return {
    n: 32,
    h: 8,
    w: 8,
    ci,
    oh: out,
    ow: out,
    co: 8,
    kh: 1,
    kw: 1,
    sh: stride,
    sw: stride,
    dh: 1,
    dw: 1,
    top: 0,
    left: 0,
    bottom: 0,
    right: 0,
  };
};

Deno.test("overrunsScratchpad: strided 1x1 filter gradients whose Ci is not a multiple of 16", () => {
  for (const ci of [1, 3, 4, 8, 12, 24]) {
    assert.ok(overrunsScratchpad("backwardWeights", pointwise(ci, 2)), `${ci}`);
  }
  for (const ci of [16, 32, 64]) assert.ok(!overrunsScratchpad("backwardWeights", pointwise(ci, 2)), `${ci}`);
  assert.ok(!overrunsScratchpad("backwardWeights", pointwise(4, 1)), "unit stride copies nothing");
  assert.ok(
    !overrunsScratchpad("backwardWeights", { ...pointwise(4, 2), kh: 3, kw: 3 }),
    "3x3 takes no copy",
  );
  assert.ok(!overrunsScratchpad("forward", pointwise(4, 2)));
  assert.ok(!overrunsScratchpad("backwardData", pointwise(4, 2)));
});

optionalTest(
  "strided 1x1 filter gradient with few input channels: exact and repeatable at 2 and 1 threads",
  ["openblas", "onednn"],
  async () => {
    await useBackend("wasm");
    for (const ci of [3, 4, 12, 16]) {
      const g = pointwise(ci, 2);
      const x = tf.randomNormal([g.n, g.h, g.w, ci], 0, 1, "float32", ci);
      const dy = tf.randomNormal([g.n, g.oh, g.ow, g.co], 0, 1, "float32", ci + 1);
      const filterGrad = () => {
        const dw = tf.engine().runKernel("Conv2DBackpropFilter", { x, dy }, {
          strides: 2,
          pad: "valid",
          dataFormat: "NHWC",
          dilations: 1,
          filterShape: [1, 1, ci, g.co],
        } as unknown as tf.NamedAttrMap) as tf.Tensor;
        const values = dw.dataSync() as Float32Array;
        dw.dispose();
        return values;
      };
      // The plain wasm kernel: the reference.
      const reference = await withKernelSettings({ blas: false }, () => Promise.resolve(filterGrad()));
      for (const threads of [2, 1]) {
        await withKernelSettings({ threads }, () => {
          const first = filterGrad();
          assert.ok(relativeError(first, reference) < 1e-5, `ci ${ci}, ${threads} threads`);
          for (let i = 0; i < 30; i++) {
            // Allocations in between, as a training step makes them.
            tf.tidy(() => tf.randomNormal([1 + 97 * i]).dataSync());
            assert.deepEqual(filterGrad(), first, `ci ${ci}, ${threads} threads, repeat ${i}`);
          }
          return Promise.resolve();
        });
      }
      x.dispose();
      dy.dispose();
    }
  },
);
