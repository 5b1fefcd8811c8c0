/**
 * bf16 mixed precision (`train.precision`): the choice of precision, oneDNN's
 * bf16 convolutions against float64 references, the whole step against fp32,
 * and runs in bf16.
 *
 * Tolerance. bf16 keeps 8 significant bits (7 stored + the implicit one), so
 * rounding an fp32 value to bf16 changes it by a relative u ≤ 2^-9. A product
 * of two rounded inputs is off by at most (1 + u)^2 − 1 < 2^-8 + 2^-18 of
 * |a·b|, and oneDNN accumulates in fp32 (at most K·2^-24 relative to Σ|a·b|
 * over K terms). Some of its AMX kernels (1x1 input gradients with few
 * channels) also hold partial or final sums in bf16, each adding at most
 * 2^-9·Σ|a·b| (seen: errors up to 1.6·2^-8 of Σ|a·b| there, against 1.0·2^-8
 * elsewhere); the bound allows two such. So every output element obeys
 *     |ŷ − y| ≤ (2^-7 + 2^-18 + K·2^-24) · Σ|a·b|
 * with y the exact (float64) value. The same kernels in fp32 are far inside
 * this bound, so each test also checks that bf16 really ran: the norm-wise
 * error ‖ŷ − y‖/‖y‖ is above 2^-14 (random inputs give about 2^-9; fp32 about 2^-23).
 *
 * The bf16 kernel tests need a processor oneDNN runs bf16 on natively
 * (avx512_bf16 or AMX): a hardware capability, not a package, so they stay
 * ignored elsewhere whatever SWAV_REQUIRE_OPTIONAL says, with the reason in
 * their names.
 */
import * as tf from "@tensorflow/tfjs";
import assert from "node:assert/strict";
import { Effect, Exit } from "effect";
import { bf16FilterGradientPays, type DnnlConvShape, overrunsScratchpad } from "../backend/onednn.ts";
import { bf16TrunkSupports } from "../backend/bf16_trunk.ts";
import { resolvePrecision } from "../backend/precision.ts";
import { backbonePlan, blocksProgram } from "../models/resnet.ts";
import { TensorBackend, withKernelSettings } from "../backend/tensor_backend.ts";
import { decodeRunConfig } from "../config/config.ts";
import { pretrain } from "../pipelines/pretrain.ts";
import { forwardBackward, swavTape } from "../pipelines/swav_step.ts";
import { makeFixture, parseBenchArgs } from "../bench/bench.ts";
import { runCli, useBackend } from "./_helpers.ts";
import { bf16Test } from "./_optional.ts";
import { readMetrics, tinyRunConfig, writeParallelConfig, writeTinyData } from "./_tiny_run.ts";

Deno.test("resolvePrecision: auto takes bf16 only where native; bf16 asked for elsewhere runs fp32 with a note", () => {
  const native = () => ({ native: true, reason: "oneDNN avx512_core_amx" });
  const emulated = () => ({ native: false, reason: "oneDNN's instruction set here is avx2" });
  assert.deepEqual(resolvePrecision("auto", "wasm", native), { precision: "bf16" });
  assert.deepEqual(resolvePrecision("auto", "wasm", emulated), { precision: "fp32" });
  assert.deepEqual(resolvePrecision("bf16", "wasm", native), { precision: "bf16" });
  const refused = resolvePrecision("bf16", "wasm", emulated);
  assert.equal(refused.precision, "fp32");
  assert.match(refused.note!, /^precision: bf16 asked for but not native here \(.*avx2\); running fp32$/);
  let asked = false;
  assert.deepEqual(resolvePrecision("fp32", "wasm", () => (asked = true, native())), { precision: "fp32" });
  assert.ok(!asked, "fp32 needs no probe");
  // Native kernels run on the wasm backend only.
  assert.deepEqual(resolvePrecision("auto", "cpu", native), { precision: "fp32" });
  assert.match(resolvePrecision("bf16", "webgpu", native).note!, /webgpu backend has no bf16 kernels/);
});

Deno.test("config: train.precision defaults to fp32 and names what is allowed", async () => {
  const config = await Effect.runPromise(decodeRunConfig({}, "test"));
  assert.equal(config.train.precision, "fp32");
  const wrong = await Effect.runPromiseExit(decodeRunConfig({ train: { precision: "fp16" } }, "test"));
  assert.ok(Exit.isFailure(wrong));
  assert.match(String(wrong.cause), /"fp32" \| "bf16" \| "auto"[\s\S]*\["train"\]\["precision"\]/);
});

/** A uniform integer in [lo, hi]. */
const pick = (lo: number, hi: number) => lo + Math.floor(Math.random() * (hi - lo + 1));

/**
 * y = conv(x, w), dx = conv^T(dy, w), dw = x ⋆ dy in float64, and the same sums
 * over |a·b| (the bound's scale), for NHWC x, HWIO w, explicit top/left padding.
 */
const reference = (
  g: DnnlConvShape,
  x: Float32Array,
  w: Float32Array,
  dy: Float32Array,
) => {
  const y = new Float64Array(g.n * g.oh * g.ow * g.co);
  const dx = new Float64Array(x.length);
  const dw = new Float64Array(w.length);
  const [ya, dxa, dwa] = [
    new Float64Array(y.length),
    new Float64Array(dx.length),
    new Float64Array(dw.length),
  ];
  for (let n = 0; n < g.n; n++) {
    for (let oh = 0; oh < g.oh; oh++) {
      for (let ow = 0; ow < g.ow; ow++) {
        const yo = ((n * g.oh + oh) * g.ow + ow) * g.co;
        for (let kh = 0; kh < g.kh; kh++) {
          const h = oh * g.sh + kh - g.top;
          if (h < 0 || h >= g.h) continue;
          for (let kw = 0; kw < g.kw; kw++) {
            const ww = ow * g.sw + kw - g.left;
            if (ww < 0 || ww >= g.w) continue;
            const xo = ((n * g.h + h) * g.w + ww) * g.ci;
            for (let ci = 0; ci < g.ci; ci++) {
              const wo = ((kh * g.kw + kw) * g.ci + ci) * g.co;
              const xv = x[xo + ci]!;
              for (let co = 0; co < g.co; co++) {
                const wv = w[wo + co]!;
                const dyv = dy[yo + co]!;
                y[yo + co]! += xv * wv;
                ya[yo + co]! += Math.abs(xv * wv);
                dx[xo + ci]! += dyv * wv;
                dxa[xo + ci]! += Math.abs(dyv * wv);
                dw[wo + co]! += xv * dyv;
                dwa[wo + co]! += Math.abs(xv * dyv);
              }
            }
          }
        }
      }
    }
  }
  return { y, ya, dx, dxa, dw, dwa };
};

let worstRatio = 0;

/** Checks the element-wise bound and returns the norm-wise relative error. */
const checkBound = (
  label: string,
  got: Float32Array,
  exact: Float64Array,
  scale: Float64Array,
  k: number,
) => {
  // Inputs rounded (2^-8 + 2^-18), sums held in bf16 up to twice (2·2^-9), fp32 accumulation (K·2^-24).
  const bound = 2 ** -8 + 2 * 2 ** -9 + 2 ** -18 + k * 2 ** -24;
  let num = 0;
  let den = 0;
  for (let i = 0; i < got.length; i++) {
    const err = Math.abs(got[i]! - exact[i]!);
    assert.ok(
      err <= bound * scale[i]! + 1e-30,
      `${label}: element ${i} off by ${err}, bound ${bound * scale[i]!} (${got[i]} vs ${exact[i]})`,
    );
    if (scale[i]! > 0) worstRatio = Math.max(worstRatio, err / scale[i]!);
    num += err * err;
    den += exact[i]! * exact[i]!;
  }
  return Math.sqrt(num / den);
};

bf16Test(
  `bf16 convolutions (forward, input and filter gradients) on random shapes within bf16's bound`,
  async () => {
    await useBackend("wasm");
    for (let trial = 0; trial < 8; trial++) {
      // The first trial takes a shape whose filter gradient runs in bf16 (bf16FilterGradientPays).
      const wide = trial === 0;
      const [kh, stride] = [pick(0, 1) === 0 ? 1 : 3, wide ? 1 : pick(1, 2)];
      const [n, h, w, ci, co] = wide
        ? [pick(2, 5), pick(16, 20), pick(16, 20), pick(4, 32), pick(4, 40)]
        : [pick(2, 5), pick(6, 20), pick(6, 20), pick(4, 40), pick(4, 40)];
      const pad = kh === 1 ? "valid" : "same";
      const info = tf.backend_util.computeConv2DInfo([n, h, w, ci], [kh, kh, ci, co], stride, 1, pad);
      const g: DnnlConvShape = {
        n,
        h,
        w,
        ci,
        oh: info.outHeight,
        ow: info.outWidth,
        co,
        kh,
        kw: kh,
        sh: stride,
        sw: stride,
        dh: 1,
        dw: 1,
        top: info.padInfo.top,
        left: info.padInfo.left,
        bottom: info.padInfo.bottom,
        right: info.padInfo.right,
      };
      const label = `n${n} ${h}x${w}x${ci} -> ${g.oh}x${g.ow}x${co}, ${kh}x${kh} stride ${stride}`;
      const seed = pick(0, 1e6);
      const x = tf.randomNormal([n, h, w, ci], 0, 1, "float32", seed) as tf.Tensor4D;
      const filter = tf.randomNormal([kh, kh, ci, co], 0, 1, "float32", seed + 1) as tf.Tensor4D;
      const dy = tf.randomNormal([n, g.oh, g.ow, co], 0, 1, "float32", seed + 2) as tf.Tensor4D;
      const attrs = { strides: stride, pad, dataFormat: "NHWC", dilations: 1 };
      const [y, dx, dw] = await withKernelSettings({ precision: "bf16" }, () =>
        Promise.resolve(
          [
            tf.conv2d(x, filter, stride, pad),
            tf.engine().runKernel("Conv2DBackpropInput", { dy, filter }, {
              ...attrs,
              inputShape: x.shape,
            } as unknown as tf.NamedAttrMap) as tf.Tensor,
            tf.engine().runKernel("Conv2DBackpropFilter", { x, dy }, {
              ...attrs,
              filterShape: filter.shape,
            } as unknown as tf.NamedAttrMap) as tf.Tensor,
          ].map((t) => {
            const v = t.dataSync() as Float32Array;
            t.dispose();
            return v;
          }),
        ));
      const r = reference(
        g,
        x.dataSync() as Float32Array,
        filter.dataSync() as Float32Array,
        dy.dataSync() as Float32Array,
      );
      tf.dispose([x, filter, dy]);
      const ran = (error: number, what: string) =>
        assert.ok(error > 2 ** -14, `${label}: ${what} error ${error} is fp32's: bf16 did not run`);
      ran(checkBound(`${label} y`, y!, r.y, r.ya, kh * kh * ci), "y");
      ran(checkBound(`${label} dx`, dx!, r.dx, r.dxa, kh * kh * co), "dx");
      const dwError = checkBound(`${label} dw`, dw!, r.dw, r.dwa, n * g.oh * g.ow);
      // Filter gradients bf16 does not speed up, and those oneDNN must not be given (OpenBLAS), stay fp32.
      if (wide) assert.ok(bf16FilterGradientPays(g) && !overrunsScratchpad("backwardWeights", g), label);
      if (bf16FilterGradientPays(g) && !overrunsScratchpad("backwardWeights", g)) ran(dwError, "dw");
      else assert.ok(dwError < 2 ** -18, `${label}: this filter gradient stays fp32 (error ${dwError})`);
    }
    console.log(`largest error / Σ|a·b|: ${(worstRatio / 2 ** -8).toFixed(2)}·2^-8`);
  },
);

bf16Test(
  `bf16: a filter gradient reuses the input gradient's bf16 copy of dy only for that same dy`,
  async () => {
    await useBackend("wasm");
    // A shape whose filter gradient runs in bf16 (bf16FilterGradientPays), so dy is rounded for both.
    const [n, h, w, ci, co] = [pick(2, 4), 16, 16, pick(4, 32), pick(4, 32)];
    const g: DnnlConvShape = {
      ...{ n, h, w, ci, oh: h, ow: w, co, kh: 3, kw: 3, sh: 1, sw: 1, dh: 1, dw: 1 },
      ...{ top: 1, left: 1, bottom: 1, right: 1 },
    };
    assert.ok(bf16FilterGradientPays(g));
    const attrs = { strides: 1, pad: "same", dataFormat: "NHWC", dilations: 1 };
    const seed = pick(0, 1e6);
    const x = tf.randomNormal([n, h, w, ci], 0, 1, "float32", seed) as tf.Tensor4D;
    const filter = tf.randomNormal([3, 3, ci, co], 0, 1, "float32", seed + 1) as tf.Tensor4D;
    const filterGradient = (dy: tf.Tensor) =>
      tf.engine().runKernel("Conv2DBackpropFilter", { x, dy }, {
        ...attrs,
        filterShape: filter.shape,
      } as unknown as tf.NamedAttrMap) as tf.Tensor;
    for (const same of [true, false]) {
      const dy1 = tf.randomNormal([n, h, w, co], 0, 1, "float32", seed + 2) as tf.Tensor4D;
      const dw = await withKernelSettings({ precision: "bf16" }, () => {
        tf.dispose(
          tf.engine().runKernel("Conv2DBackpropInput", { dy: dy1, filter }, {
            ...attrs,
            inputShape: x.shape,
          } as unknown as tf.NamedAttrMap) as tf.Tensor,
        );
        if (same) return Promise.resolve({ dy: dy1, dw: filterGradient(dy1) });
        // Another dy of the same shape, most likely at the freed one's heap address: its own copy.
        dy1.dispose();
        const dy2 = tf.randomNormal([n, h, w, co], 0, 1, "float32", seed + 3) as tf.Tensor4D;
        return Promise.resolve({ dy: dy2, dw: filterGradient(dy2) });
      });
      const r = reference(
        g,
        x.dataSync() as Float32Array,
        filter.dataSync() as Float32Array,
        dw.dy.dataSync() as Float32Array,
      );
      const label = `n${n} 16x16x${ci} -> ${co}, ${same ? "same" : "another"} dy`;
      const error = checkBound(`${label} dw`, dw.dw.dataSync() as Float32Array, r.dw, r.dwa, n * h * w);
      assert.ok(error > 2 ** -14, `${label}: dw error ${error} is fp32's: bf16 did not run`);
      tf.dispose([dw.dy, dw.dw]);
    }
    tf.dispose([x, filter]);
  },
);

bf16Test(
  `bf16: the copies of x and dy live on the wasm heap for their call only, bar one held copy of dy`,
  async () => {
    await useBackend("wasm");
    const backend = tf.backend();
    // Heap buffers that are no tensor's: the copies the convolution kernels hold.
    const extra = () => backend.numDataIds() - tf.memory().numDataBuffers;
    const [n, ci, co] = [pick(2, 4), pick(4, 32), pick(4, 32)];
    const x = tf.randomNormal([n, 16, 16, ci]) as tf.Tensor4D;
    const filter = tf.randomNormal([3, 3, ci, co]) as tf.Tensor4D;
    const before = extra();
    const seen: number[] = [];
    for (let i = 0; i < 4; i++) {
      await withKernelSettings({ precision: "bf16" }, () => {
        const grads = tf.grads((a: tf.Tensor, b: tf.Tensor) =>
          tf.sum(tf.square(tf.conv2d(a as tf.Tensor4D, b as tf.Tensor4D, 1, "same")))
        )([x, filter]);
        tf.dispose(grads);
        return Promise.resolve();
      });
      seen.push(extra() - before);
    }
    assert.ok(seen.every((k) => k <= 1), `heap buffers beyond the tensors after each step: ${seen}`);
    assert.equal(new Set(seen).size, 1, `heap buffers beyond the tensors grew: ${seen}`);
    tf.dispose([x, filter]);
  },
);

/** Loss and gradients of one step of a small SwAV model at `precision` (same weights, same crops). */
const stepAt = async (precision: "fp32" | "bf16", roundCrops = false) => {
  const o = parseBenchArgs([
    "--width",
    "8",
    "--batch",
    "8",
    "--crops",
    "2x32+2x16",
    "--hidden",
    "32",
    "--out",
    "16",
  ]);
  const fixture = makeFixture({ ...o, prototypes: 30 });
  const crops = roundCrops
    ? fixture.crops.map((c) => tf.tensor(toBf16(c.dataSync() as Float32Array), c.shape))
    : [];
  try {
    return await withKernelSettings({ precision }, () => {
      const parts = swavTape(fixture.model, fixture.config, o.batch);
      const tape = forwardBackward(
        parts,
        roundCrops ? crops as tf.Tensor4D[] : fixture.crops,
        Object.values(fixture.variables),
      );
      const loss = tape.loss.dataSync()[0]!;
      // By parameter name (each fixture's tf.Variables have names of their own).
      const grads = Object.fromEntries(
        Object.entries(fixture.variables).flatMap(([name, v]) => {
          const g = tape.grads[v.name];
          return g === undefined ? [] : [[name, Float64Array.from(g.dataSync())]];
        }),
      );
      tf.dispose([tape.loss, tape.embeddings, ...tape.codes, ...Object.values(tape.grads)]);
      if (tape.features !== undefined) tf.dispose(tape.features);
      return Promise.resolve({ loss, grads });
    });
  } finally {
    tf.dispose(crops);
    fixture.dispose();
  }
};

/** Rounds fp32 values to the nearest bf16 (ties to even), kept as fp32. */
const toBf16 = (values: Float32Array): Float32Array => {
  const out = Float32Array.from(values);
  const bits = new Uint32Array(out.buffer);
  for (let i = 0; i < bits.length; i++) {
    const b = bits[i]!;
    bits[i] = ((b + 0x7fff + ((b >>> 16) & 1)) >>> 16) << 16;
  }
  return out;
};

bf16Test(
  `the whole step in bf16: loss and every gradient near fp32's`,
  async () => {
    await useBackend("wasm");
    const fp32 = await stepAt("fp32");
    const bf16 = await stepAt("bf16");
    // The yardstick: the fp32 step on the same crops rounded to bf16. At initialisation SwAV's gradient
    // is a small difference (codes − softmax) and Sinkhorn (ε = 0.05) multiplies score changes by 20,
    // so rounding the images alone moves the gradients by 1-30 % norm-wise. bf16 rounds the inputs of
    // every convolution (~20 in the forward, ~40 in the backward) instead of the images only: if those
    // roundings add up independently, in quadrature, its change is up to √40 ≈ 6 times the yardstick's.
    // (Seen: at most 3.1 times, on the projection head's and the prototypes' gradients.)
    const rounded = await stepAt("fp32", true);
    // The loss (a mean cross-entropy, ≈ ln 30) within 2^-8 relative (seen: 2^-10).
    assert.ok(
      Math.abs(bf16.loss - fp32.loss) <= 2 ** -8 * Math.abs(fp32.loss),
      `loss ${bf16.loss} vs ${fp32.loss}`,
    );
    const normwise = (a: Float64Array, b: Float64Array) => {
      let num = 0;
      let den = 0;
      for (let i = 0; i < a.length; i++) {
        num += (a[i]! - b[i]!) ** 2;
        den += b[i]! ** 2;
      }
      return den === 0 ? 0 : Math.sqrt(num / den);
    };
    let worst = 0;
    for (const [name, g] of Object.entries(fp32.grads)) {
      const change = normwise(bf16.grads[name]!, g);
      const yardstick = normwise(rounded.grads[name]!, g);
      worst = Math.max(worst, change);
      assert.ok(
        change <= 6 * yardstick + 2 ** -20,
        `${name}: bf16 changes it by ${change}, rounding the crops by ${yardstick}`,
      );
    }
    assert.ok(worst > 2 ** -14, `gradients equal to fp32's (${worst}): bf16 did not run`);
  },
);

/** A tiny run of `steps` steps at `precision`: its losses and the live tensor count after each step. */
const tinyRunAt = async (data: string, precision: "fp32" | "bf16", steps: number) => {
  const out = await Deno.makeTempDir({ prefix: `swav-precision-${precision}-` });
  try {
    const config = await Effect.runPromise(
      decodeRunConfig(
        tinyRunConfig(data, out, { epochs: 100, knnEvery: 0, maxSteps: steps }, { width: RUN_WIDTH }),
        "test",
      ),
    );
    const losses: number[] = [];
    const tensors: number[] = [];
    const exit = await Effect.runPromiseExit(
      pretrain(config, {
        hooks: {
          onStep: (m) => {
            losses.push(m.loss);
            tensors.push(tf.memory().numTensors);
          },
        },
      }).pipe(Effect.provide(TensorBackend.layer("wasm", { precision }))),
    );
    if (Exit.isFailure(exit)) throw new Error(`tiny run failed: ${exit.cause}`);
    const written = JSON.parse(await Deno.readTextFile(`${out}/config.json`));
    return { losses, tensors, precision: written.train.precision as string };
  } finally {
    await Deno.remove(out, { recursive: true });
  }
};

// 200 steps (ten windows of 20): about 35 s for both runs on a quiet 2-core machine at width 16.
const RUN_STEPS = 200;
// Width 16: the narrowest whose layers oneDNN takes on bf16 activations, so that bf16 runs the trunk.
const RUN_WIDTH = 16;

bf16Test(
  `${RUN_STEPS} steps of a tiny run in bf16 follow the fp32 loss curve; live tensors stay flat`,
  async () => {
    const data = await writeTinyData();
    try {
      // The run's two crop groups (2x16 px and 2x8 px, batch 16) go through the bf16 trunk.
      const plan = backbonePlan({ arch: "resnet18", width: RUN_WIDTH, inputChannels: 3, stem: "cifar" });
      for (const side of [16, 8]) {
        assert.ok(
          bf16TrunkSupports(blocksProgram(plan, [32, side, side, 3], true).program),
          `${side} px crops`,
        );
      }
      const fp32 = await tinyRunAt(data, "fp32", RUN_STEPS);
      const bf16 = await tinyRunAt(data, "bf16", RUN_STEPS);
      assert.equal(fp32.precision, "fp32");
      assert.equal(bf16.precision, "bf16", "config.json records the precision that ran");
      assert.equal(bf16.losses.length, RUN_STEPS);
      // Single steps differ by the batch's noise (different codes send the two runs on different
      // paths); the curve is the mean over windows of 20 steps. The band: 5 % of the starting loss.
      const window = 20;
      const band = 0.05 * fp32.losses[0]!;
      for (let start = 0; start < RUN_STEPS; start += window) {
        const mean = (xs: number[]) => xs.slice(start, start + window).reduce((a, b) => a + b, 0) / window;
        const [a, b] = [mean(fp32.losses), mean(bf16.losses)];
        console.log(
          `steps ${start}-${start + window}: fp32 ${a.toFixed(4)}, bf16 ${b.toFixed(4)} (band ${
            band.toFixed(4)
          })`,
        );
        assert.ok(
          Math.abs(a - b) <= band,
          `steps ${start}-${start + window}: fp32 ${a}, bf16 ${b}, band ${band}`,
        );
      }
      // The curve went down (else following it would say little).
      assert.ok(
        fp32.losses.at(-1)! < fp32.losses[0]! - band,
        `fp32 losses ${fp32.losses[0]} -> ${fp32.losses.at(-1)}`,
      );
      // No tensor leak: the live count after each step is the same once the run is under way.
      const steady = bf16.tensors.slice(10);
      assert.equal(Math.max(...steady), Math.min(...steady), `live tensors ${steady.join(" ")}`);
    } finally {
      await Deno.remove(data, { recursive: true });
    }
  },
);

Deno.test("CLI: --precision bf16 where it is not native runs fp32 and says so in one line", async () => {
  const data = await writeTinyData();
  const folder = await Deno.makeTempDir();
  try {
    await Deno.writeTextFile(`${folder}/tiny.json`, JSON.stringify(tinyRunConfig(data, `${folder}/run`)));
    // The ISA query faked: no native bf16.
    const r = await runCli(
      ["pretrain", "--config", `${folder}/tiny.json`, "--precision", "bf16", "--max-steps", "2"],
      { SWAV_BF16_NATIVE: "0" },
    );
    assert.equal(r.code, 0, r.stderr);
    assert.match(
      r.stderr,
      /^precision: bf16 asked for but not native here \(SWAV_BF16_NATIVE=0\); running fp32$/m,
    );
    assert.match(r.stderr, /^precision fp32$/m);
    const config = JSON.parse(await Deno.readTextFile(`${folder}/run/config.json`));
    assert.equal(config.train.precision, "fp32");
    const environment = JSON.parse(await Deno.readTextFile(`${folder}/run/environment.json`));
    assert.deepEqual(environment.precision, { auto: "fp32", reason: "SWAV_BF16_NATIVE=0", run: "fp32" });
  } finally {
    await Deno.remove(folder, { recursive: true });
    await Deno.remove(data, { recursive: true });
  }
});

bf16Test(
  `CLI: an fp32 run resumed with --precision auto continues in bf16 from the same fp32 checkpoint`,
  async () => {
    const data = await writeTinyData();
    const folder = await Deno.makeTempDir();
    try {
      const run = `${folder}/run`;
      await Deno.writeTextFile(`${folder}/tiny.json`, JSON.stringify(tinyRunConfig(data, run)));
      const first = await runCli(["pretrain", "--config", `${folder}/tiny.json`, "--max-steps", "2"]);
      assert.equal(first.code, 0, first.stderr);
      assert.match(first.stderr, /^precision fp32$/m);
      const resumed = await runCli([
        "pretrain",
        "--config",
        `${folder}/tiny.json`,
        "--resume",
        "--precision",
        "auto",
        "--max-steps",
        "4",
        "--json",
      ]);
      assert.equal(resumed.code, 0, resumed.stderr);
      assert.match(resumed.stderr, /resumed from .* at step 2/);
      assert.match(resumed.stderr, /^precision bf16: convolutions in bfloat16/m);
      assert.equal(JSON.parse(resumed.stdout.trim().split("\n").at(-1)!).steps, 4);
      const config = JSON.parse(await Deno.readTextFile(`${run}/config.json`));
      assert.equal(config.train.precision, "bf16");
      const environment = JSON.parse(await Deno.readTextFile(`${run}/environment.json`));
      assert.equal(environment.precision.run, "bf16");
    } finally {
      await Deno.remove(folder, { recursive: true });
      await Deno.remove(data, { recursive: true });
    }
  },
);

bf16Test(
  `data parallel in bf16: 2 processes, gradients averaged in fp32, weights equal on both`,
  async () => {
    const data = await writeTinyData();
    const dir = await Deno.makeTempDir({ prefix: "swav-bf16-mpi-" });
    try {
      const config = await writeParallelConfig(data, dir);
      const out = `${dir}/run`;
      // SWAV_DEBUG_PARAMS: every step checks that the ranks' weights agree bit for bit.
      const r = await runCli(
        [
          "pretrain",
          "--config",
          config,
          "--out",
          out,
          "--procs",
          "2",
          "--precision",
          "bf16",
          "--max-steps",
          "3",
        ],
        { SWAV_DEBUG_PARAMS: "1" },
      );
      assert.equal(r.code, 0, r.stderr);
      assert.equal((await readMetrics(out)).length, 3);
      assert.equal(JSON.parse(await Deno.readTextFile(`${out}/config.json`)).train.precision, "bf16");
    } finally {
      await Deno.remove(dir, { recursive: true });
      await Deno.remove(data, { recursive: true });
    }
  },
  ["mpich"],
);
