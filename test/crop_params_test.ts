/**
 * RandomResizedCrop geometry replayed draw by draw against torchvision's
 * `RandomResizedCrop.get_params`, re-implemented below in float64 from
 * torchvision's source, fed the same uniform draws as the project's code.
 *
 * The statistical tests in augment_test.ts cannot see a w/h swap under a
 * ratio range symmetric in log space, nor a placement range one pixel short;
 * here each case uses an asymmetric ratio range, a non-square image and draws
 * at both ends of [0, 1), so either mistake changes the box.
 */
import assert from "node:assert/strict";
import { type CropBox, pythonRound, randomResizedCropParams } from "../data/augment.ts";
import { type Rng, rngFor } from "../data/rng.ts";
import { defaultMulticropConfig, MulticropConfig, sampleCropParams } from "../stages/multicrop.ts";
import { Schema } from "effect";

/** The largest double below 1: a uniform draw at the top end of [0, 1). */
const TOP = 1 - 2 ** -53;

/**
 * An Rng whose `next()` returns `draws` in order (then fails), with the
 * derived draws defined as torch defines them: `uniform_(a, b)` is
 * a + (b - a) u and `randint(low, high + 1)` is low + floor(u (high - low + 1)).
 */
const scripted = (draws: readonly number[]): Rng & { used: () => number } => {
  let at = 0;
  const next = (): number => {
    assert.ok(at < draws.length, `scripted rng: draw ${at} requested, only ${draws.length} scripted`);
    return draws[at++]!;
  };
  return {
    ...rngFor(0),
    next,
    uniform: (low, high) => low + (high - low) * next(),
    int: (low, high) => low + Math.floor(next() * (high - low + 1)),
    bernoulli: (p) => next() < p,
    used: () => at,
  };
};

/**
 * torchvision `RandomResizedCrop.get_params(img, scale, ratio)` with its
 * random draws taken from `u` (each in [0, 1)):
 *   target_area = area * U(scale); aspect = exp(U(log ratio));
 *   w = round(sqrt(target_area * aspect)); h = round(sqrt(target_area / aspect));
 *   if 0 < w <= W and 0 < h <= H: i = randint(0, H - h + 1); j = randint(0, W - w + 1)
 *   (randint's upper bound is exclusive); after 10 misses the centre crop with the ratio clamped.
 */
const torchvisionGetParams = (
  height: number,
  width: number,
  scale: readonly [number, number],
  ratio: readonly [number, number],
  u: readonly number[],
): { box: CropBox; draws: number } => {
  let k = 0;
  const area = height * width;
  const logRatio = [Math.log(ratio[0]), Math.log(ratio[1])];
  for (let attempt = 0; attempt < 10; attempt++) {
    const targetArea = area * (scale[0] + (scale[1] - scale[0]) * u[k++]!);
    const aspect = Math.exp(logRatio[0]! + (logRatio[1]! - logRatio[0]!) * u[k++]!);
    const w = pythonRound(Math.sqrt(targetArea * aspect));
    const h = pythonRound(Math.sqrt(targetArea / aspect));
    if (0 < w && w <= width && 0 < h && h <= height) {
      const i = Math.floor(u[k++]! * (height - h + 1));
      const j = Math.floor(u[k++]! * (width - w + 1));
      return { box: { top: i, left: j, height: h, width: w }, draws: k };
    }
  }
  const inRatio = width / height;
  const [lo, hi] = [Math.min(...ratio), Math.max(...ratio)];
  let w = width;
  let h = height;
  if (inRatio < lo) h = pythonRound(w / lo);
  else if (inRatio > hi) {
    w = pythonRound(h * hi);
  }
  return {
    box: { top: Math.floor((height - h) / 2), left: Math.floor((width - w) / 2), height: h, width: w },
    draws: k,
  };
};

interface Case {
  readonly height: number;
  readonly width: number;
  readonly scale: readonly [number, number];
  readonly ratio: readonly [number, number];
  readonly draws: readonly number[];
}

const check = (c: Case, label: string): CropBox => {
  const want = torchvisionGetParams(c.height, c.width, c.scale, c.ratio, c.draws);
  const rng = scripted(c.draws);
  const got = randomResizedCropParams(c.height, c.width, c.scale, c.ratio, rng);
  assert.deepEqual(got, want.box, `${label}: ${JSON.stringify(c)}`);
  assert.equal(rng.used(), want.draws, `${label}: number of draws`);
  return got;
};

Deno.test("randomResizedCropParams replays torchvision get_params: asymmetric ratio, both placement ends", () => {
  // Non-square images (taller and wider), ratio ranges not symmetric in log space.
  const images: readonly [number, number][] = [[37, 91], [120, 45], [64, 64]];
  const ratios: readonly [number, number][] = [[0.5, 1.5], [1, 3], [1 / 3, 1]];
  for (const [height, width] of images) {
    for (const ratio of ratios) {
      for (const scaleDraw of [0, 0.37, 0.81]) {
        for (const ratioDraw of [0, 0.29, 0.93]) {
          // Placement at the bottom of the range, the top of it, and mixed.
          for (const [ti, li] of [[0, 0], [TOP, TOP], [0, TOP], [TOP, 0], [0.5, 0.25]]) {
            const draws = [scaleDraw, ratioDraw, ti!, li!];
            // Pad with draws that make later attempts succeed, in case the first misses.
            const c: Case = {
              height,
              width,
              scale: [0.08, 0.6],
              ratio,
              draws: [...draws, ...draws.flatMap(() => draws)],
            };
            check(c, "replay");
          }
        }
      }
    }
  }
});

Deno.test("randomResizedCropParams: the box's shape follows the ratio range's side (width / height)", () => {
  // Ratio range [2, 3] only: every box is at least twice as wide as tall.
  const box = check(
    { height: 50, width: 100, scale: [0.3, 0.3], ratio: [2, 3], draws: [0, 0, 0, 0] },
    "wide",
  );
  // area 1500 at aspect 2: w = round(sqrt(3000)) = 55, h = round(sqrt(750)) = 27.
  assert.deepEqual([box.width, box.height], [55, 27]);
  const tall = check(
    { height: 100, width: 50, scale: [0.3, 0.3], ratio: [0.5, 0.5], draws: [0, 0, 0, 0] },
    "tall",
  );
  assert.deepEqual([tall.width, tall.height], [27, 55]);
});

Deno.test("randomResizedCropParams: the placement reaches both ends, bottom row and right column included", () => {
  for (const [height, width] of [[37, 91], [91, 37]] as const) {
    const low = check({ height, width, scale: [0.2, 0.2], ratio: [1, 2], draws: [0, 0.5, 0, 0] }, "low end");
    assert.deepEqual([low.top, low.left], [0, 0]);
    const high = check(
      { height, width, scale: [0.2, 0.2], ratio: [1, 2], draws: [0, 0.5, TOP, TOP] },
      "high end",
    );
    assert.equal(high.top + high.height, height, "the crop touches the bottom edge");
    assert.equal(high.left + high.width, width, "the crop touches the right edge");
  }
});

Deno.test("randomResizedCropParams: misses draw again, then fall back to the clamped centre crop", () => {
  // A scale draw of 1 at ratio 3 cannot fit in a 40x40 image: the second attempt (scale 0) fits.
  check(
    { height: 40, width: 40, scale: [0.5, 1], ratio: [1, 3], draws: [TOP, TOP, 0, 0, 0.3, 0.6] },
    "retry",
  );
  // Ten misses on a tall image: width kept, height clamped to the widest ratio.
  const misses = Array.from({ length: 20 }, () => TOP);
  const tall = check({ height: 90, width: 20, scale: [1, 1], ratio: [1, 3], draws: misses }, "fallback tall");
  assert.deepEqual(tall, { top: 35, left: 0, height: 20, width: 20 });
  const wide = check(
    { height: 20, width: 90, scale: [1, 1], ratio: [1 / 3, 2], draws: misses },
    "fallback wide",
  );
  assert.deepEqual(wide, { top: 0, left: 25, height: 20, width: 40 });
});

Deno.test("sampleCropParams: each crop group draws its area from its own scale range", () => {
  const config = Schema.decodeUnknownSync(MulticropConfig)({
    ...defaultMulticropConfig,
    nmbCrops: [1, 1, 1],
    sizeCrops: [32, 16, 8],
    minScaleCrops: [0.5, 0.1, 0.02],
    maxScaleCrops: [0.9, 0.3, 0.05],
    aspectRatio: [0.75, 2],
  });
  const [height, width] = [70, 110];
  for (let group = 0; group < 3; group++) {
    const scale = [config.minScaleCrops[group]!, config.maxScaleCrops[group]!] as const;
    for (const scaleDraw of [0, 0.5, TOP]) {
      // Crop draws first, then flip, jitter, grayscale, blur: pad with draws of 0.99 (nothing applied).
      const draws = [scaleDraw, 0.4, 0.3, 0.6, ...Array.from({ length: 12 }, () => 0.99)];
      const want = torchvisionGetParams(height, width, scale, config.aspectRatio, draws).box;
      const got = sampleCropParams(height, width, group, config, scripted(draws)).box;
      assert.deepEqual(got, want, `group ${group}, scale draw ${scaleDraw}`);
      const fraction = (got.width * got.height) / (width * height);
      // Rounding each side by up to half a pixel moves the area by under (w + h) / 2 + 1/4 pixels.
      const slack = (got.width + got.height + 1) / 2 / (width * height);
      assert.ok(
        fraction >= scale[0] - slack && fraction <= scale[1] + slack,
        `group ${group}: area fraction ${fraction} outside its scale range [${scale}]`,
      );
    }
  }
});
