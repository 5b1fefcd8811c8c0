/**
 * Native kernels on wasm (backend/openblas.ts, backend/onednn.ts, backend/native_kernels.ts): each
 * matches the plain wasm kernel (XNNPACK / the polyphase and swapped-axes
 * fallbacks) on fresh random shapes, and a whole training step's loss and
 * gradients match with and without BLAS. Skipped (with a note) where OpenBLAS
 * is not installed.
 */
import * as tf from "@tensorflow/tfjs";
import assert from "node:assert/strict";
import { optionalTest } from "./_optional.ts";
import { im2col } from "../backend/im2col.ts";
import { defaultKernelSettings } from "../backend/kernel_settings.ts";
import { dnnlInfo } from "../backend/onednn.ts";
import { blasInfo } from "../backend/openblas.ts";
import { withKernelSettings } from "../backend/tensor_backend.ts";
import { disposeModel, makeSwavModel, trainableVariables } from "../models/model.ts";
import { forwardBackward, swavTape } from "../pipelines/swav_step.ts";
import { benchRunConfig, parseBenchArgs } from "../bench/bench.ts";
import { assertNoTensorLeak, relativeError, useBackend } from "./_helpers.ts";

console.log(`OpenBLAS: ${JSON.stringify(blasInfo())}, oneDNN: ${JSON.stringify(dnnlInfo())}`);

/** float32 tolerance for sums of up to a few thousand products in another order. */
const TOLERANCE = 2e-5;

/** Runs `f` with the BLAS kernels on and off (on top of `settings`); returns both results' values. */
const bothWays = async (
  f: () => tf.Tensor,
  settings: Partial<typeof defaultKernelSettings> = {},
): Promise<[Float32Array, Float32Array]> => {
  const run = (on: boolean) =>
    withKernelSettings({ ...settings, blas: on }, async () => {
      const out = f();
      const data = (await out.data()) as Float32Array;
      out.dispose();
      return data;
    });
  return [await run(true), await run(false)];
};

/** The same computation on TF.js's cpu backend (plain loops: the float32 reference). */
const onCpu = async (f: () => tf.Tensor): Promise<Float32Array> => {
  await tf.setBackend("cpu");
  try {
    const out = f();
    const data = (await out.data()) as Float32Array;
    out.dispose();
    return data;
  } finally {
    await tf.setBackend("wasm");
  }
};

// Fresh shapes each run; SWAV_TEST_SEED=N replays the run that printed `blas_test seed N`.
let seed = Number(Deno.env.get("SWAV_TEST_SEED") ?? (Date.now() % 100000) + 1);
const int = (low: number, high: number) => {
  seed = (seed * 16807) % 2147483647;
  return low + (seed % (high - low + 1));
};

optionalTest("blas kernels match the plain wasm kernels", ["openblas"], async (t) => {
  await useBackend("wasm");
  console.log(`blas_test seed ${seed}`);
  await t.step("im2col lays out KH x KW x Ci columns, zeros in the padding", () => {
    // 1 image 3x3x2, 2x2 filter, stride 1, pad top/left 1: first row reads (−1,−1), (−1,0), (0,−1), (0,0).
    const x = Float32Array.from({ length: 18 }, (_, i) => i + 1);
    const g = {
      n: 1,
      h: 3,
      w: 3,
      ci: 2,
      oh: 3,
      ow: 3,
      co: 1,
      kh: 2,
      kw: 2,
      sh: 1,
      sw: 1,
      dh: 1,
      dw: 1,
      top: 1,
      left: 1,
    };
    const col = new Float32Array(9 * 8);
    im2col(x, g, 0, 1, col);
    assert.deepEqual([...col.subarray(0, 8)], [0, 0, 0, 0, 0, 0, 1, 2]);
    // Output (1, 1) reads rows 0..1, columns 0..1: pixels 0, 1, 3, 4.
    assert.deepEqual([...col.subarray(4 * 8, 5 * 8)], [1, 2, 3, 4, 7, 8, 9, 10]);
  });

  await t.step("conv2d forward and both gradients on random shapes", async () => {
    // Every convolution through BLAS (no width threshold); odd trials with one image per im2col chunk.
    await assertNoTensorLeak("conv", async () => {
      for (let trial = 0; trial < 14; trial++) {
        const settings = {
          minColumns: 0,
          chunkFloats: trial % 2 ? 1 : defaultKernelSettings.chunkFloats,
          // Half the trials through oneDNN (where it loads), half through im2col + OpenBLAS.
          dnnl: trial % 4 < 2,
        };
        const n = trial === 0 ? 1 : int(1, 5);
        const k = [1, 2, 3, 5][int(0, 3)]!;
        const stride = int(1, 3);
        const h = int(k, 13);
        const w = int(k, 13);
        const ci = int(1, 9);
        const co = int(1, 9);
        const pad = (["same", "valid", int(0, 2)] as const)[int(0, 2)]!;
        const x = tf.randomNormal([n, h, w, ci]) as tf.Tensor4D;
        const filter = tf.randomNormal([k, k, ci, co]) as tf.Tensor4D;
        const y = tf.conv2d(x, filter, stride, pad);
        const dy = tf.randomNormal(y.shape) as tf.Tensor4D;
        const label = `x [${x.shape}] k ${k} stride ${stride} pad ${pad}`;
        const cases: [string, () => tf.Tensor][] = [
          ["forward", () => tf.conv2d(x, filter, stride, pad)],
          ["input gradient", () => tf.conv2dTranspose(dy, filter, x.shape, stride, pad)],
          [
            "filter gradient",
            () =>
              tf.grad((f: tf.Tensor) => tf.sum(tf.mul(tf.conv2d(x, f as tf.Tensor4D, stride, pad), dy)))(
                filter,
              ),
          ],
        ];
        for (const [name, f] of cases) {
          const [fast, plain] = await bothWays(f, settings);
          const reference = await onCpu(f);
          const error = relativeError(fast, reference);
          assert.ok(error < TOLERANCE, `${name} ${label}: BLAS vs cpu relative error ${error}`);
          // XNNPACK's own forward is wrong when the stride exceeds the filter with 'same' padding
          // (the BLAS kernel takes those); everywhere else BLAS and the plain kernels agree.
          if (name !== "forward" || !(stride > k && pad === "same")) {
            const plainError = relativeError(fast, plain);
            assert.ok(
              plainError < TOLERANCE,
              `${name} ${label}: BLAS vs plain wasm relative error ${plainError}`,
            );
          }
        }
        tf.dispose([x, filter, y, dy]);
      }
    });
  });

  await t.step("matMul with every transpose, batch 1 and batched", async () => {
    await assertNoTensorLeak("matMul", async () => {
      for (let trial = 0; trial < 10; trial++) {
        const batch = trial < 4 ? 0 : int(1, 3);
        const [m, k, n] = [int(1, 40), int(1, 40), int(1, 40)];
        const ta = int(0, 1) === 1;
        const tb = int(0, 1) === 1;
        const aShape = [...(batch ? [batch] : []), ...(ta ? [k, m] : [m, k])];
        const bShape = [...(batch && trial % 2 ? [batch] : []), ...(tb ? [n, k] : [k, n])];
        const a = tf.randomNormal(aShape);
        const b = tf.randomNormal(bShape);
        const [fast, plain] = await bothWays(() => tf.matMul(a, b, ta, tb));
        const error = relativeError(fast, plain);
        assert.ok(error < TOLERANCE, `matMul [${aShape}] x [${bShape}] ${ta} ${tb}: relative error ${error}`);
        tf.dispose([a, b]);
      }
    });
  });

  await t.step("fused matMul: bias, linear and relu, every transpose, batched", async () => {
    await assertNoTensorLeak("fused matMul", async () => {
      for (let trial = 0; trial < 12; trial++) {
        const batch = trial < 6 ? 0 : int(1, 3);
        const [m, k, n] = [int(1, 40), int(1, 40), int(1, 40)];
        const ta = int(0, 1) === 1;
        const tb = int(0, 1) === 1;
        const activation = (["linear", "relu"] as const)[trial % 2]!;
        const aShape = [...(batch ? [batch] : []), ...(ta ? [k, m] : [m, k])];
        const bShape = [...(batch ? [batch] : []), ...(tb ? [n, k] : [k, n])];
        const a = tf.randomNormal(aShape);
        const b = tf.randomNormal(bShape);
        const bias = trial % 3 === 2 ? undefined : tf.randomNormal([n]);
        // The reference is the unfused composition on the plain kernels: tfjs-backend-wasm 4.22's own
        // _FusedMatMul adds the bias wrongly whenever an operand is transposed (seen as errors of ~3).
        const [fast] = await bothWays(() =>
          tf.fused.matMul({ a, b, transposeA: ta, transposeB: tb, bias, activation })
        );
        const [, plain] = await bothWays(() =>
          tf.tidy(() => {
            const product = tf.matMul(a, b, ta, tb);
            const biased = bias === undefined ? product : tf.add(product, bias);
            return activation === "relu" ? tf.relu(biased) : biased;
          })
        );
        const error = relativeError(fast, plain);
        assert.ok(
          error < TOLERANCE,
          `fused matMul [${aShape}] x [${bShape}] ${ta} ${tb} bias [${bias?.shape}] ${activation}: error ${error}`,
        );
        tf.dispose([a, b, ...(bias ? [bias] : [])]);
      }
    });
  });
});

optionalTest(
  "a training step's loss and gradients match with and without BLAS",
  ["openblas"],
  async () => {
    await useBackend("wasm");
    const options = parseBenchArgs([
      "--width",
      "8",
      "--batch",
      "8",
      "--crops",
      "2x16+2x8",
      "--hidden",
      "64",
      "--out",
      "16",
      "--prototypes",
      "30",
    ]);
    const config = benchRunConfig(options);
    const model = makeSwavModel(config.model, 3);
    const crops = options.crops.map(([n, s], i) =>
      tf.randomNormal([n * options.batch, s, s, 3], 0, 1, "float32", 20 + i) as tf.Tensor4D
    );
    const variables = trainableVariables(model);
    const parts = swavTape(model, config, options.batch);
    const run = (on: boolean) =>
      withKernelSettings({ blas: on }, async () => {
        const tape = forwardBackward(parts, crops, variables);
        const loss = (await tape.loss.data())[0]!;
        const grads = await Promise.all(
          variables.map(async (v) => (await tape.grads[v.name]!.data()) as Float32Array),
        );
        tf.dispose([tape.loss, tape.embeddings, ...tape.codes, ...Object.values(tape.grads)]);
        return { loss, grads };
      });
    try {
      await assertNoTensorLeak("step", async () => {
        const fast = await run(true);
        const plain = await run(false);
        assert.ok(
          Math.abs(fast.loss - plain.loss) < 1e-5 * Math.abs(plain.loss),
          `loss ${fast.loss} vs ${plain.loss}`,
        );
        const norm = (a: ArrayLike<number>) => Math.sqrt(Array.from(a).reduce((s, x) => s + x * x, 0));
        const largest = Math.max(...plain.grads.map(norm));
        variables.forEach((v, i) => {
          // A bias followed by BatchNorm has a zero gradient in exact arithmetic (rounding noise here),
          // so each difference is measured against max(‖g‖, 1e-3 · largest ‖g‖); BatchNorm's backward
          // also subtracts near-equal terms, hence 1e-3 rather than the kernels' 2e-5.
          const diff = norm(fast.grads[i]!.map((x, j) => x - plain.grads[i]![j]!));
          const scale = Math.max(norm(plain.grads[i]!), 1e-3 * largest);
          assert.ok(
            diff / scale < 1e-3,
            `gradient of ${v.name} [${v.shape}]: relative error ${diff / scale}`,
          );
        });
      });
    } finally {
      tf.dispose(crops);
      disposeModel(model);
    }
  },
);
