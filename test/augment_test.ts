/**
 * Image ops of data/augment.ts against torchvision (fixtures from
 * reference/augment_reference.py: float64 tensors, fresh random images of
 * several sizes) and statistical tests of RandomResizedCrop's sampling.
 */
import assert from "node:assert/strict";
import fc from "fast-check";
import {
  adjustBrightness,
  adjustContrast,
  adjustHue,
  adjustSaturation,
  colorJitter,
  cropResize,
  gaussianBlur,
  gaussianKernelSize,
  hflip,
  normalizeInto,
  pythonRound,
  randomResizedCropParams,
  rgbToGrayscale,
  sampleColorJitter,
} from "../data/augment.ts";
import { type Rng, rngFor } from "../data/rng.ts";

interface Case {
  readonly height: number;
  readonly width: number;
  readonly image: number[];
  readonly expected: number[];
}
const fixture = JSON.parse(await Deno.readTextFile(new URL("./fixtures/augment.json", import.meta.url)));

const maxAbsError = (got: ArrayLike<number>, want: ArrayLike<number>): number => {
  assert.equal(got.length, want.length, `length ${got.length} != ${want.length}`);
  let worst = 0;
  for (let i = 0; i < want.length; i++) worst = Math.max(worst, Math.abs(got[i] - want[i]));
  return worst;
};

// Values in [0, 1] held in float32 (relative rounding 6e-8) after a handful of
// float64 steps: 1e-5 absolute leaves room for float32 storage between steps
// (the reference keeps float64 throughout) and nothing for a wrong formula.
const TOLERANCE = 1e-5;

Deno.test("cropResize matches torchvision resized_crop(antialias=True) (+ hflip)", async (t) => {
  for (const [n, c] of (fixture.resize as (Case & Record<string, number & boolean>)[]).entries()) {
    await t.step(
      `case ${n}: ${c.cropHeight}x${c.cropWidth} -> ${c.outHeight}x${c.outWidth}${c.flip ? " flipped" : ""}`,
      () => {
        const out = new Float32Array(c.outHeight * c.outWidth * 3);
        const box = { top: c.top, left: c.left, height: c.cropHeight, width: c.cropWidth };
        cropResize(Uint8Array.from(c.image), c.width, box, c.outHeight, c.outWidth, c.flip, out);
        const err = maxAbsError(out, c.expected);
        assert.ok(err < TOLERANCE, `max abs error ${err}`);
      },
    );
  }
  await t.step("a float source is taken as [0, 1] values", () => {
    const c = fixture.resize[0];
    const source = Float32Array.from(c.image as number[], (v) => v / 255);
    const out = new Float32Array(c.outHeight * c.outWidth * 3);
    cropResize(
      source,
      c.width,
      { top: c.top, left: c.left, height: c.cropHeight, width: c.cropWidth },
      c.outHeight,
      c.outWidth,
      c.flip,
      out,
    );
    assert.ok(maxAbsError(out, c.expected) < TOLERANCE);
  });
});

Deno.test("colour ops match torchvision's tensor adjust_* for fixed factors", async (t) => {
  const ops = {
    brightness: adjustBrightness,
    contrast: adjustContrast,
    saturation: adjustSaturation,
    hue: adjustHue,
  };
  for (const c of fixture.colour as (Case & { op: keyof typeof ops; factor: number })[]) {
    await t.step(`${c.op} ${c.factor} on ${c.height}x${c.width}`, () => {
      const rgb = Float32Array.from(c.image);
      ops[c.op](rgb, c.factor);
      const err = maxAbsError(rgb, c.expected);
      assert.ok(err < TOLERANCE, `max abs error ${err}`);
    });
  }
});

Deno.test("colorJitter applies the ops in the given order as ColorJitter.forward", async (t) => {
  for (
    const [n, c] of (fixture
      .jitter as (Case & {
        order: number[];
        brightness: number;
        contrast: number;
        saturation: number;
        hue: number;
      })[]).entries()
  ) {
    await t.step(`case ${n}: order ${c.order}`, () => {
      const rgb = Float32Array.from(c.image);
      colorJitter(rgb, c);
      const err = maxAbsError(rgb, c.expected);
      assert.ok(err < TOLERANCE, `max abs error ${err}`);
    });
  }
  await t.step("disabled ops (undefined factor) are skipped", () => {
    const c = fixture.jitter[0];
    const rgb = Float32Array.from(c.image as number[]);
    colorJitter(rgb, {
      order: [0, 1, 2, 3],
      brightness: undefined,
      contrast: undefined,
      saturation: undefined,
      hue: undefined,
    });
    assert.deepEqual(rgb, Float32Array.from(c.image as number[]));
  });
});

Deno.test("rgbToGrayscale matches rgb_to_grayscale(num_output_channels=3)", () => {
  for (const c of fixture.grayscale as Case[]) {
    const rgb = Float32Array.from(c.image);
    rgbToGrayscale(rgb);
    assert.ok(maxAbsError(rgb, c.expected) < TOLERANCE);
  }
});

Deno.test("gaussianBlur matches torchvision gaussian_blur (same kernel size and sigma)", async (t) => {
  for (const c of fixture.blur as (Case & { sigma: number; kernelSize: number })[]) {
    await t.step(`sigma ${c.sigma}, kernel ${c.kernelSize}, ${c.height}x${c.width}`, () => {
      assert.equal(gaussianKernelSize(c.sigma), c.kernelSize);
      const rgb = Float32Array.from(c.image);
      gaussianBlur(rgb, c.height, c.width, c.sigma);
      const err = maxAbsError(rgb, c.expected);
      assert.ok(err < TOLERANCE, `max abs error ${err}`);
    });
  }
  await t.step("a kernel wider than the image still reflects (folded again)", () => {
    // 3x2 image, sigma 2 (kernel 13): compare with a direct float64 2-D convolution.
    const h = 3, w = 2, sigma = 2;
    const image = Float32Array.from({ length: h * w * 3 }, () => Math.random());
    const k = gaussianKernelSize(sigma);
    const r = k >> 1;
    const g = Array.from({ length: k }, (_, i) => Math.exp(-0.5 * ((i - r) / sigma) ** 2));
    const sum = g.reduce((a, b) => a + b);
    const reflect = (i: number, n: number) => {
      while (i < 0 || i >= n) i = i < 0 ? -i : 2 * (n - 1) - i;
      return i;
    };
    const want = new Float64Array(image.length);
    for (let y = 0; y < h; y++) {
      for (let x = 0; x < w; x++) {
        for (let c = 0; c < 3; c++) {
          let acc = 0;
          for (let dy = -r; dy <= r; dy++) {
            for (let dx = -r; dx <= r; dx++) {
              acc += (g[dy + r] / sum) * (g[dx + r] / sum) *
                image[(reflect(y + dy, h) * w + reflect(x + dx, w)) * 3 + c];
            }
          }
          want[(y * w + x) * 3 + c] = acc;
        }
      }
    }
    const got = Float32Array.from(image);
    gaussianBlur(got, h, w, sigma);
    assert.ok(maxAbsError(got, want) < TOLERANCE);
  });
});

Deno.test("normalizeInto matches Normalize, and luma for one channel", () => {
  const c = fixture.normalize[0];
  const out = normalizeInto(
    Float32Array.from(c.image as number[]),
    new Float32Array(c.image.length),
    c.mean,
    c.std,
    3,
  );
  assert.ok(maxAbsError(out, c.expected) < 5 * TOLERANCE); // values scaled by 1/std ~ 4.4
  const rgb = Float32Array.from({ length: 30 }, () => Math.random());
  const grey = normalizeInto(rgb, new Float32Array(10), [0.5], [0.25], 1);
  const want = Array.from(
    { length: 10 },
    (_, p) =>
      ((rgb[3 * p] * 299) / 1000 + (rgb[3 * p + 1] * 587) / 1000 + (rgb[3 * p + 2] * 114) / 1000 - 0.5) /
      0.25,
  );
  assert.ok(maxAbsError(grey, want) < 5 * TOLERANCE);
});

Deno.test("hflip mirrors columns", () => {
  const buffer = Float32Array.from({ length: 2 * 3 * 3 }, (_, i) => i);
  const flipped = hflip(Float32Array.from(buffer), 2, 3, 3);
  for (let y = 0; y < 2; y++) {
    for (let x = 0; x < 3; x++) {
      for (let c = 0; c < 3; c++) assert.equal(flipped[(y * 3 + x) * 3 + c], buffer[(y * 3 + 2 - x) * 3 + c]);
    }
  }
});

Deno.test("pythonRound rounds half to even like Python's round", () => {
  // Python: [round(x) for x in (0.5, 1.5, 2.5, 3.5, -0.5, -1.5, 2.4999, 2.5001, 7)] (signed zero aside).
  const got = [0.5, 1.5, 2.5, 3.5, -0.5, -1.5, 2.4999, 2.5001, 7].map((x) => pythonRound(x) + 0);
  assert.deepEqual(got, [0, 2, 2, 4, 0, -2, 2, 3, 7]);
});

/** Kolmogorov-Smirnov distance of `samples` from the uniform distribution on [low, high]. */
const ksUniform = (samples: number[], low: number, high: number): number => {
  const sorted = [...samples].sort((a, b) => a - b);
  let d = 0;
  sorted.forEach((x, i) => {
    const cdf = Math.min(1, Math.max(0, (x - low) / (high - low)));
    d = Math.max(d, Math.abs(cdf - i / sorted.length), Math.abs(cdf - (i + 1) / sorted.length));
  });
  return d;
};

Deno.test("randomResizedCropParams: ranges and distributions (torchvision get_params)", async (t) => {
  // Fresh draws each run (thresholds below hold with overwhelming probability); SWAV_TEST_SEED=N replays a run.
  const seed = Number(Deno.env.get("SWAV_TEST_SEED") ?? Date.now() % 1000003);
  await t.step(
    `boxes lie in the image, area and aspect ratio in range up to integer rounding (seed ${seed})`,
    () => {
      const rng = rngFor(seed, 1);
      const [height, width] = [375, 500];
      const scale = [0.05, 0.14] as const;
      const ratio = [3 / 4, 4 / 3] as const;
      const areas: number[] = [];
      const logRatios: number[] = [];
      for (let n = 0; n < 4000; n++) {
        const box = randomResizedCropParams(height, width, scale, ratio, rng);
        assert.ok(box.top >= 0 && box.left >= 0 && box.height >= 1 && box.width >= 1);
        assert.ok(box.top + box.height <= height && box.left + box.width <= width);
        // w and h are rounded to integers, w = W + a and h = H + b with |a|, |b| <= 1/2:
        // |wh - WH| = |aH + bW + ab| <= (W + H + 1/2) / 2.
        const fraction = (box.width * box.height) / (height * width);
        const slack = (box.width + box.height + 0.5) / 2 / (height * width);
        assert.ok(fraction >= scale[0] - slack && fraction <= scale[1] + slack, `area fraction ${fraction}`);
        // Both sides are rounded: the unrounded h lies within H +- 0.5 and w within W +- 0.5, with
        // w / h in the ratio range, so W >= ratio0 (H - 0.5) - 0.5 and W <= ratio1 (H + 0.5) + 0.5.
        const r = box.width / box.height;
        assert.ok(
          box.width >= ratio[0] * (box.height - 0.5) - 0.5 - 1e-9 &&
            box.width <= ratio[1] * (box.height + 0.5) + 0.5 + 1e-9,
          `aspect ratio ${r} (${box.width} x ${box.height})`,
        );
        areas.push(fraction);
        logRatios.push(Math.log(r));
      }
      // Every attempt fits at this scale, so the area fraction is uniform on the scale range and the log
      // aspect ratio uniform on the log ratio range (blurred by the rounding). KS critical value at
      // alpha 1e-6 for n = 4000 is 0.043; rounding adds < 0.01.
      const dArea = ksUniform(areas, scale[0], scale[1]);
      const dRatio = ksUniform(logRatios, Math.log(ratio[0]), Math.log(ratio[1]));
      assert.ok(dArea < 0.05, `area KS distance ${dArea}`);
      assert.ok(dRatio < 0.05, `log aspect ratio KS distance ${dRatio}`);
    },
  );

  await t.step("placement is uniform over the free range", () => {
    const rng = rngFor(seed, 2);
    const lefts: number[] = [];
    for (let n = 0; n < 4000; n++) {
      const box = randomResizedCropParams(375, 500, [0.05, 0.05], [1, 1], rng);
      // sqrt(0.05 * 187500) = 96.8 -> 97 x 97; left uniform on {0..403}
      assert.equal(box.width, 97);
      lefts.push((box.left + 0.5) / 404);
    }
    assert.ok(ksUniform(lefts, 0, 1) < 0.05);
  });

  await t.step("after 10 failed attempts: centre crop, aspect ratio clamped into the range", () => {
    // At scale 1 a 20x100 (wide, ratio 5) image never fits a box of ratio <= 4/3 with h <= 20.
    const wide = randomResizedCropParams(20, 100, [1, 1], [3 / 4, 4 / 3], rngFor(seed, 3));
    const w = pythonRound(20 * (4 / 3));
    assert.deepEqual(wide, { top: 0, left: Math.floor((100 - w) / 2), height: 20, width: w });
    const tall = randomResizedCropParams(100, 20, [1, 1], [3 / 4, 4 / 3], rngFor(seed, 4));
    const h = pythonRound(20 / (3 / 4));
    assert.deepEqual(tall, { top: Math.floor((100 - h) / 2), left: 0, height: h, width: 20 });
    // In range: whole image.
    let calls = 0;
    const failing: Rng = {
      ...rngFor(seed, 5),
      uniform: (low, high) => (calls++, calls % 2 === 1 ? high * 50 : low),
    };
    assert.deepEqual(randomResizedCropParams(30, 35, [0.5, 1], [3 / 4, 4 / 3], failing), {
      top: 0,
      left: 0,
      height: 30,
      width: 35,
    });
    assert.equal(calls, 20, "10 attempts, two draws each");
  });

  await t.step("property: any image and scale range gives a valid box", () => {
    fc.assert(
      fc.property(
        fc.integer({ min: 1, max: 600 }),
        fc.integer({ min: 1, max: 600 }),
        fc.double({ min: 0.001, max: 1, noNaN: true }),
        fc.double({ min: 0.001, max: 1, noNaN: true }),
        fc.integer(),
        (height, width, a, b, key) => {
          const box = randomResizedCropParams(
            height,
            width,
            [Math.min(a, b), Math.max(a, b)],
            [3 / 4, 4 / 3],
            rngFor(key),
          );
          return box.top >= 0 && box.left >= 0 && box.height >= 1 && box.width >= 1 &&
            box.top + box.height <= height && box.left + box.width <= width;
        },
      ),
      { numRuns: 500 },
    );
  });
});

Deno.test("sampleColorJitter: factor ranges, random order, disabled ops", () => {
  const rng = rngFor(Date.now() % 1000003, 7);
  const strength = { brightness: 0.8, contrast: 0.4, saturation: 1.5, hue: 0.2 };
  const firstOp = [0, 0, 0, 0];
  let brightnessSum = 0;
  const n = 4000;
  for (let i = 0; i < n; i++) {
    const p = sampleColorJitter(strength, rng);
    assert.deepEqual(Array.from(p.order).sort(), [0, 1, 2, 3]);
    firstOp[p.order[0]]++;
    assert.ok(p.brightness! >= 0.2 && p.brightness! <= 1.8);
    assert.ok(p.contrast! >= 0.6 && p.contrast! <= 1.4);
    assert.ok(p.saturation! >= 0 && p.saturation! <= 2.5);
    assert.ok(p.hue! >= -0.2 && p.hue! <= 0.2);
    brightnessSum += p.brightness!;
  }
  // Mean of U(0.2, 1.8) is 1, sd 0.46: 6 standard errors is 0.044.
  assert.ok(Math.abs(brightnessSum / n - 1) < 0.044, `mean brightness factor ${brightnessSum / n}`);
  // Each op first with probability 1/4: 6 standard errors of 4000 draws is 0.041.
  for (const count of firstOp) {
    assert.ok(Math.abs(count / n - 0.25) < 0.041, `first-op frequencies ${firstOp}`);
  }
  const none = sampleColorJitter({ brightness: 0, contrast: 0, saturation: 0, hue: 0 }, rng);
  assert.deepEqual([none.brightness, none.contrast, none.saturation, none.hue], [
    undefined,
    undefined,
    undefined,
    undefined,
  ]);
});
