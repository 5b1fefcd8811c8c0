/**
 * multicrop stage: config schema, crop layout, determinism, collation, the
 * whole per-crop pipeline and the eval transform against torchvision
 * (fixtures from reference/augment_reference.py).
 */
import * as tf from "@tensorflow/tfjs";
import { Effect, Schema } from "effect";
import assert from "node:assert/strict";
import { rngFor } from "../data/rng.ts";
import {
  applyCropParams,
  collateCrops,
  defaultMulticropConfig,
  evalTransform,
  MulticropConfig,
  multicropSample,
  multicropStage,
  sampleCropParams,
  smallImageProfile,
} from "../stages/multicrop.ts";
import { configure } from "../stages/stage.ts";
import type { RgbImage } from "../data/image_codec.ts";
import { assertNoTensorLeak } from "./_helpers.ts";

await tf.setBackend("cpu");

const fixture = JSON.parse(await Deno.readTextFile(new URL("./fixtures/augment.json", import.meta.url)));

const randomImage = (width: number, height: number): RgbImage => ({
  width,
  height,
  data: Uint8Array.from({ length: width * height * 3 }, () => Math.floor(Math.random() * 256)),
});

const maxAbsError = (got: ArrayLike<number>, want: ArrayLike<number>): number => {
  assert.equal(got.length, want.length);
  let worst = 0;
  for (let i = 0; i < want.length; i++) worst = Math.max(worst, Math.abs(got[i] - want[i]));
  return worst;
};

const decode = Schema.decodeUnknownSync(MulticropConfig);

Deno.test("MulticropConfig: reference defaults, small-image profile, errors name the field", async (t) => {
  await t.step("defaults are the SwAV reference's", () => {
    const c = decode({});
    assert.deepEqual(
      [c.nmbCrops, c.sizeCrops, c.minScaleCrops, c.maxScaleCrops],
      [[2, 6], [224, 96], [0.14, 0.05], [1, 0.14]],
    );
    assert.deepEqual([c.brightness, c.contrast, c.saturation, c.hue], [0.8, 0.8, 0.8, 0.2]);
    assert.deepEqual([c.jitterProbability, c.grayscaleProbability, c.blur, c.blurProbability], [
      0.8,
      0.2,
      true,
      0.5,
    ]);
    assert.deepEqual([c.blurSigma, c.flipProbability, c.channels], [[0.1, 2.0], 0.5, 3]);
    assert.deepEqual([c.mean, c.std], [[0.485, 0.456, 0.406], [0.228, 0.224, 0.225]]);
    assert.deepEqual(defaultMulticropConfig, c);
  });
  await t.step("the small-image profile decodes to 2x32 + 4x16 without blur", () => {
    const c = decode(smallImageProfile);
    assert.deepEqual([c.nmbCrops, c.sizeCrops, c.blur], [[2, 4], [32, 16], false]);
  });
  const bad: [string, Record<string, unknown>][] = [
    ["sizeCrops", { sizeCrops: [224] }],
    ["minScaleCrops", { minScaleCrops: [0.5, 0.05], maxScaleCrops: [0.4, 0.14] }],
    ["maxScaleCrops", { maxScaleCrops: [1.5, 0.14] }],
    ["minScaleCrops", { minScaleCrops: [0, 0.05] }],
    ["nmbCrops", { nmbCrops: [2, 0] }],
    ["channels", { channels: 2 }],
    ["jitterProbability", { jitterProbability: 1.5 }],
    ["hue", { hue: 0.7 }],
    ["std", { std: [0.2, 0, 0.2] }],
    ["blurSigma", { blurSigma: [2, 1] }],
    ["aspectRatio", { aspectRatio: [0, 1] }],
  ];
  for (const [field, raw] of bad) {
    await t.step(`${JSON.stringify(raw)} is rejected naming ${field}`, async () => {
      const result = await Effect.runPromise(Effect.result(configure(multicropStage, raw)));
      assert.equal(result._tag, "Failure");
      const message = result._tag === "Failure" ? result.failure.message : "";
      assert.match(message, new RegExp(field), message);
    });
  }
});

Deno.test("multicropSample: crops grouped by size, normalised HWC, channels 3 or 1", () => {
  const image = randomImage(67, 41);
  const config = decode({ sizeCrops: [40, 16] });
  const crops = multicropSample(image, config, rngFor(1, 2, 3));
  assert.deepEqual(crops.map((c) => c.length), [40, 40, 16, 16, 16, 16, 16, 16].map((s) => s * s * 3));
  for (const crop of crops) {
    // [0, 1] values normalised by the ImageNet statistics stay within [-0.485/0.228, (1-0.406)/0.225].
    for (const v of crop) assert.ok(Number.isFinite(v) && v >= -2.12 && v <= 2.65, `value ${v}`);
  }
  const grey = multicropSample(image, decode({ sizeCrops: [40, 16], channels: 1 }), rngFor(1, 2, 3));
  assert.deepEqual(grey.map((c) => c.length), [40, 40, 16, 16, 16, 16, 16, 16].map((s) => s * s));
  assert.throws(
    () => multicropSample({ width: 4, height: 4, data: new Uint8Array(10) }, config, rngFor(0)),
    /data length/,
  );
});

Deno.test("multicropSample is deterministic in (seed, epoch, index), whatever the order of samples", () => {
  const config = decode(smallImageProfile);
  const images = Array.from({ length: 6 }, () => randomImage(32, 32));
  const forward = images.map((image, i) => multicropSample(image, config, rngFor(7, 1, i)));
  // Another order, interleaved with other keys' work (as concurrent workers would be).
  const backward: Float32Array[][] = [];
  for (let i = images.length - 1; i >= 0; i--) {
    multicropSample(images[(i + 1) % images.length], config, rngFor(99, 5, i));
    backward[i] = multicropSample(images[i], config, rngFor(7, 1, i));
  }
  assert.deepEqual(backward, forward);
  const otherEpoch = multicropSample(images[0], config, rngFor(7, 2, 0));
  assert.notDeepEqual(otherEpoch, forward[0]);
});

Deno.test("sampleCropParams draws flip, jitter, grayscale and blur with the configured probabilities", () => {
  const config = decode({});
  const rng = rngFor(Date.now() % 1000003, 11);
  const n = 4000;
  const counts = { flip: 0, jitter: 0, grayscale: 0, blur: 0 };
  let sigmaSum = 0;
  for (let i = 0; i < n; i++) {
    const p = sampleCropParams(375, 500, i % 2, config, rng);
    if (p.flip) counts.flip++;
    if (p.jitter) counts.jitter++;
    if (p.grayscale) counts.grayscale++;
    if (p.blurSigma !== undefined) {
      counts.blur++;
      assert.ok(p.blurSigma >= 0.1 && p.blurSigma <= 2);
      sigmaSum += p.blurSigma;
    }
  }
  // 6 standard errors of a proportion over 4000 draws: at most 0.048.
  const within = (count: number, p: number) => Math.abs(count / n - p) < 6 * Math.sqrt((p * (1 - p)) / n);
  assert.ok(within(counts.flip, 0.5), `flip ${counts.flip}`);
  assert.ok(within(counts.jitter, 0.8), `jitter ${counts.jitter}`);
  assert.ok(within(counts.grayscale, 0.2), `grayscale ${counts.grayscale}`);
  assert.ok(within(counts.blur, 0.5), `blur ${counts.blur}`);
  // sigma ~ U(0.1, 2): mean 1.05, sd 0.55; 6 standard errors of ~2000 draws is 0.074.
  assert.ok(Math.abs(sigmaSum / counts.blur - 1.05) < 0.074);
  const noBlur = decode({ blur: false });
  for (let i = 0; i < 200; i++) assert.equal(sampleCropParams(32, 32, 0, noBlur, rng).blurSigma, undefined);
});

Deno.test("applyCropParams: the whole crop pipeline matches torchvision step by step", async (t) => {
  for (const [n, c] of (fixture.pipeline as Record<string, never>[]).entries()) {
    await t.step(`case ${n}`, () => {
      const image: RgbImage = {
        width: c.width,
        height: c.height,
        data: Uint8Array.from(c.image as number[]),
      };
      const params = {
        box: c.box,
        flip: c.flip,
        jitter: c.jitter ?? undefined,
        grayscale: c.grayscale,
        blurSigma: c.blurSigma ?? undefined,
      };
      // Normalised values (scaled by 1/std ~ 4.4) after a chain of float32 steps.
      const rgb = applyCropParams(image, params, c.size, { channels: 3, mean: c.mean, std: c.std });
      const errRgb = maxAbsError(rgb, c.expected);
      assert.ok(errRgb < 1e-4, `rgb max abs error ${errRgb}`);
      const grey = applyCropParams(image, params, c.size, { channels: 1, mean: c.mean, std: c.std });
      const errGrey = maxAbsError(grey, c.expectedGrey);
      assert.ok(errGrey < 1e-4, `grey max abs error ${errGrey}`);
    });
  }
});

Deno.test("evalTransform matches Resize(shorter side) + CenterCrop + Normalize", async (t) => {
  for (const c of fixture.eval as Record<string, never>[]) {
    await t.step(`${c.height}x${c.width} -> resize ${c.resize}, crop ${c.size}`, () => {
      const image: RgbImage = {
        width: c.width,
        height: c.height,
        data: Uint8Array.from(c.image as number[]),
      };
      const out = evalTransform(image, {
        size: c.size,
        resize: c.resize,
        channels: 3,
        mean: c.mean,
        std: c.std,
      });
      const err = maxAbsError(out, c.expected);
      assert.ok(err < 1e-4, `max abs error ${err}`);
    });
  }
  await t.step("an image of the target size is only normalised", () => {
    const image = randomImage(8, 8);
    const out = evalTransform(image, { size: 8, channels: 3, mean: [0.5, 0.5, 0.5], std: [0.5, 0.5, 0.5] });
    assert.ok(maxAbsError(out, Array.from(image.data, (v) => (v / 255 - 0.5) / 0.5)) < 1e-5);
  });
});

Deno.test("collateCrops stacks crop-major per size group", async () => {
  await assertNoTensorLeak("collateCrops", async () => {
    const config = decode({ nmbCrops: [2, 3], sizeCrops: [6, 4] });
    const batch = 4;
    const samples = Array.from(
      { length: batch },
      (_, b) => multicropSample(randomImage(20 + b, 15), config, rngFor(3, 0, b)),
    );
    const tensors = collateCrops(samples, config);
    try {
      assert.deepEqual(tensors.map((x) => x.shape), [[2 * batch, 6, 6, 3], [3 * batch, 4, 4, 3]]);
      const [large, small] = await Promise.all(tensors.map((x) => x.data()));
      for (let b = 0; b < batch; b++) {
        for (let v = 0; v < 2; v++) {
          const row = large.subarray((v * batch + b) * 108, (v * batch + b + 1) * 108);
          assert.deepEqual(row, samples[b][v]);
        }
        for (let v = 0; v < 3; v++) {
          const row = small.subarray((v * batch + b) * 48, (v * batch + b + 1) * 48);
          assert.deepEqual(row, samples[b][2 + v]);
        }
      }
    } finally {
      tf.dispose(tensors);
    }
    assert.throws(() => collateCrops([samples[0].slice(1)], config), /has 4 crops, config has 5/);
  });
});

Deno.test("multicropStage runs a configured sample keyed by (seed, epoch, index)", async () => {
  const image = randomImage(50, 40);
  const step = await Effect.runPromise(configure(multicropStage, { sizeCrops: [24, 12] }));
  const crops = await Effect.runPromise(step({ image, seed: 5, epoch: 2, index: 17 }));
  assert.equal(crops.length, 8);
  assert.deepEqual(crops, multicropSample(image, decode({ sizeCrops: [24, 12] }), rngFor(5, 2, 17)));
});
