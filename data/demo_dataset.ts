/**
 * The built-in demo data set: labelled 32x32 images of coloured shapes and
 * textures, generated from a seed and written as PNG files, one subfolder per
 * class, so the demo needs no download and still exercises the PNG decoder.
 *
 * Each class is a shape or texture; colour, position, size, rotation and
 * background noise vary per image, so a classifier has to learn the form,
 * not the colour: colour is exactly what SwAV's augmentations teach a network
 * to ignore.
 */
import { Image } from "imagescript";
import { readRegularFile } from "./files.ts";
import { type Rng, rngFor } from "./rng.ts";

export const demoClasses = [
  "disc",
  "square",
  "triangle",
  "cross",
  "ring",
  "stripes",
  "checker",
  "dots",
  "zigzag",
  "gradient",
] as const;

/** Inside-test for one class at image coordinates (u, v) in [-1, 1], after rotation and scaling. */
type Painter = (u: number, v: number, rng: { phase: number; period: number }) => boolean | number;

const painters: Record<(typeof demoClasses)[number], Painter> = {
  disc: (u, v) => u * u + v * v < 0.5,
  square: (u, v) => Math.abs(u) < 0.6 && Math.abs(v) < 0.6,
  triangle: (u, v) => v > -0.6 && v < 0.7 && Math.abs(u) < (0.7 - v) * 0.6,
  cross: (u, v) => (Math.abs(u) < 0.2 && Math.abs(v) < 0.8) || (Math.abs(v) < 0.2 && Math.abs(u) < 0.8),
  ring: (u, v) => {
    const r = u * u + v * v;
    return r < 0.64 && r > 0.25;
  },
  stripes: (u, _v, p) => Math.sin((u * Math.PI * 2) / p.period + p.phase) > 0,
  checker: (u, v, p) =>
    (Math.sin((u * Math.PI * 2) / p.period + p.phase) > 0) !== (Math.sin((v * Math.PI * 2) / p.period) > 0),
  dots: (u, v, p) => {
    const a = ((u / p.period) % 1 + 1) % 1 - 0.5;
    const b = ((v / p.period + p.phase) % 1 + 1) % 1 - 0.5;
    return a * a + b * b < 0.06;
  },
  zigzag: (u, v, p) =>
    Math.sin(((u + 0.25 * Math.abs(((v / 0.5) % 2 + 2) % 2 - 1)) * Math.PI * 2) / p.period + p.phase) > 0,
  gradient: (u, v) => Math.max(0, Math.min(1, (u + v + 1.4) / 2.8)),
};

const randomColour = (rng: Rng): [number, number, number] => {
  // Saturated colours with a random hue, so colour carries no class information.
  const h = rng.next() * 6;
  const x = 1 - Math.abs((h % 2) - 1);
  const rgb: [number, number, number] = h < 1
    ? [1, x, 0]
    : h < 2
    ? [x, 1, 0]
    : h < 3
    ? [0, 1, x]
    : h < 4
    ? [0, x, 1]
    : h < 5
    ? [x, 0, 1]
    : [1, 0, x];
  const value = rng.uniform(0.6, 1);
  return rgb.map((c) => c * value) as [number, number, number];
};

/** Renders one demo image (RGB, HWC) for a class, deterministically from the rng. */
export const renderDemoImage = (classIndex: number, size: number, rng: Rng): Uint8Array => {
  const painter = painters[demoClasses[classIndex]!];
  const fg = randomColour(rng);
  const bg = randomColour(rng).map((c) => c * 0.35) as [number, number, number];
  const angle = rng.uniform(0, Math.PI * 2);
  const scale = rng.uniform(0.7, 1.2);
  const shiftU = rng.uniform(-0.25, 0.25);
  const shiftV = rng.uniform(-0.25, 0.25);
  const params = { phase: rng.uniform(0, Math.PI * 2), period: rng.uniform(0.35, 0.6) };
  const cos = Math.cos(angle);
  const sin = Math.sin(angle);
  const out = new Uint8Array(size * size * 3);
  for (let y = 0; y < size; y++) {
    for (let x = 0; x < size; x++) {
      const px = ((x + 0.5) / size) * 2 - 1 - shiftU;
      const py = ((y + 0.5) / size) * 2 - 1 - shiftV;
      const u = (cos * px - sin * py) / scale;
      const v = (sin * px + cos * py) / scale;
      const inside = painter(u, v, params);
      const t = typeof inside === "number" ? inside : inside ? 1 : 0;
      for (let c = 0; c < 3; c++) {
        const noise = (rng.next() - 0.5) * 0.12;
        const value = bg[c]! * (1 - t) + fg[c]! * t + noise;
        out[(y * size + x) * 3 + c] = Math.max(0, Math.min(255, Math.round(value * 255)));
      }
    }
  }
  return out;
};

/** Where `writeDemoDataset` writes, how many images per class and split, their size and the seed. */
export interface DemoDatasetOptions {
  /** The folder to write (replaced when it holds a different copy). */
  readonly folder: string;
  /** Training images per class. */
  readonly perClassTrain: number;
  /** Test images per class. */
  readonly perClassTest: number;
  /** Side of the square images in pixels. */
  readonly size: number;
  /** Seed of the generator: the same options write the same files. */
  readonly seed: number;
}

/**
 * Writes the data set as `folder/train/<class>/<n>.png` and `folder/test/<class>/<n>.png`
 * (the image-folder layout with splits), unless a complete copy with the same
 * options is already there (`folder/demo.json` records them).
 */
export const writeDemoDataset = async (options: DemoDatasetOptions): Promise<void> => {
  const stamp = `${options.folder}/demo.json`;
  const wanted = JSON.stringify({ ...options, classes: demoClasses, version: 1 });
  // A stamp that is missing (not there yet) or unreadable reads as a string: the data set is rewritten.
  const stamped = await readRegularFile(stamp, 2 ** 16);
  if (stamped instanceof Uint8Array && new TextDecoder().decode(stamped) === wanted) return;
  await Deno.remove(options.folder, { recursive: true }).catch(() => undefined);
  for (
    const [split, count, splitKey] of [["train", options.perClassTrain, 0], [
      "test",
      options.perClassTest,
      1,
    ]] as const
  ) {
    for (let c = 0; c < demoClasses.length; c++) {
      const dir = `${options.folder}/${split}/${demoClasses[c]}`;
      await Deno.mkdir(dir, { recursive: true });
      for (let i = 0; i < count; i++) {
        const pixels = renderDemoImage(c, options.size, rngFor(options.seed, splitKey, c, i));
        const image = new Image(options.size, options.size);
        const rgba = image.bitmap;
        for (let p = 0; p < options.size * options.size; p++) {
          rgba[p * 4] = pixels[p * 3]!;
          rgba[p * 4 + 1] = pixels[p * 3 + 1]!;
          rgba[p * 4 + 2] = pixels[p * 3 + 2]!;
          rgba[p * 4 + 3] = 255;
        }
        await Deno.writeFile(`${dir}/${String(i).padStart(4, "0")}.png`, await image.encode());
      }
    }
  }
  // Written last: a partial data set (interrupted generation) is regenerated next time.
  await Deno.writeTextFile(stamp, wanted);
};
