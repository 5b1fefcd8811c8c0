/**
 * Multicrop throughput, images per second on one thread (= per worker), next
 * to SwAV's torchvision + PIL transform (bench/multicrop_reference.py,
 * torch.set_num_threads(1)) measured in the same run on the same images size.
 *
 *     npx deno run -A bench/multicrop_bench.ts [--quick]
 *
 * Images are smooth synthetic RGB (noise upscaled), ~500x375 for the ImageNet
 * recipe and 32x32 for the small-image cases.
 */
import { Schema } from "effect";
import { rngFor } from "../data/rng.ts";
import { MulticropConfig, multicropSample, smallImageProfile } from "../stages/multicrop.ts";
import type { RgbImage } from "../data/image_codec.ts";

const quick = Deno.args.includes("--quick");

/** Smooth random image: bilinear upscale of an 8x smaller noise image. */
const syntheticImage = (width: number, height: number, seed: number): RgbImage => {
  const rng = rngFor(seed, 0x1ba9e);
  const sw = Math.max(2, width >> 3);
  const sh = Math.max(2, height >> 3);
  const small = Uint8Array.from({ length: sw * sh * 3 }, () => Math.floor(rng.next() * 256));
  const data = new Uint8Array(width * height * 3);
  for (let y = 0; y < height; y++) {
    const fy = Math.min(sh - 1, Math.max(0, ((y + 0.5) * sh) / height - 0.5));
    const y0 = Math.floor(fy);
    const y1 = Math.min(sh - 1, y0 + 1);
    const wy = fy - y0;
    for (let x = 0; x < width; x++) {
      const fx = Math.min(sw - 1, Math.max(0, ((x + 0.5) * sw) / width - 0.5));
      const x0 = Math.floor(fx);
      const x1 = Math.min(sw - 1, x0 + 1);
      const wx = fx - x0;
      for (let c = 0; c < 3; c++) {
        const v = (1 - wy) * ((1 - wx) * small[(y0 * sw + x0) * 3 + c] + wx * small[(y0 * sw + x1) * 3 + c]) +
          wy * ((1 - wx) * small[(y1 * sw + x0) * 3 + c] + wx * small[(y1 * sw + x1) * 3 + c]);
        data[(y * width + x) * 3 + c] = Math.round(v);
      }
    }
  }
  return { width, height, data };
};

interface Case {
  readonly name: string;
  readonly width: number;
  readonly height: number;
  readonly images: number;
  readonly config: Record<string, unknown>;
}

const cases: Case[] = [
  { name: "2x224+6x96 from 500x375", width: 500, height: 375, images: quick ? 30 : 150, config: {} },
  {
    name: "2x32 from 32x32",
    width: 32,
    height: 32,
    images: quick ? 500 : 4000,
    config: { nmbCrops: [2], sizeCrops: [32], minScaleCrops: [0.14], maxScaleCrops: [1] },
  },
  {
    name: "2x32+4x16 from 32x32 (smallImageProfile, no blur)",
    width: 32,
    height: 32,
    images: quick ? 500 : 4000,
    config: smallImageProfile,
  },
];

const timeTs = (c: Case): number => {
  const config = Schema.decodeUnknownSync(MulticropConfig)(c.config);
  const images = Array.from({ length: 16 }, (_, i) => syntheticImage(c.width, c.height, i));
  for (let i = 0; i < Math.min(50, c.images); i++) multicropSample(images[i % 16], config, rngFor(1, 0, i)); // warm-up (JIT)
  const start = performance.now();
  let sink = 0;
  for (let i = 0; i < c.images; i++) sink += multicropSample(images[i % 16], config, rngFor(1, 1, i)).length;
  const seconds = (performance.now() - start) / 1000;
  if (sink === 0) throw new Error("no crops");
  return c.images / seconds;
};

const timeReference = async (c: Case): Promise<number | undefined> => {
  const config = Schema.decodeUnknownSync(MulticropConfig)(c.config);
  const args = [
    new URL("./multicrop_reference.py", import.meta.url).pathname,
    "--width",
    String(c.width),
    "--height",
    String(c.height),
    "--images",
    String(Math.ceil(c.images / 2)),
    "--nmb",
    ...config.nmbCrops.map(String),
    "--size",
    ...config.sizeCrops.map(String),
    "--min-scale",
    ...config.minScaleCrops.map(String),
    "--max-scale",
    ...config.maxScaleCrops.map(String),
    ...(config.blur ? [] : ["--no-blur"]),
  ];
  try {
    const output = await new Deno.Command("/usr/bin/python3", {
      args,
      env: { OMP_NUM_THREADS: "1", MKL_NUM_THREADS: "1" },
      stderr: "inherit",
    }).output();
    if (!output.success) return undefined;
    return JSON.parse(new TextDecoder().decode(output.stdout).trim().split("\n").at(-1)!).imagesPerSecond;
  } catch {
    return undefined; // no Python / torchvision here: report ours alone
  }
};

console.log(`multicrop, one thread (${navigator.hardwareConcurrency} cores visible)`);
console.log("| case | swav-ts images/s | torchvision+PIL images/s | ratio |");
console.log("| --- | ---: | ---: | ---: |");
for (const c of cases) {
  const ours = timeTs(c);
  const reference = await timeReference(c);
  const ratio = reference === undefined ? "n/a" : (ours / reference).toFixed(2);
  console.log(`| ${c.name} | ${ours.toFixed(1)} | ${reference?.toFixed(1) ?? "n/a"} | ${ratio} |`);
}
