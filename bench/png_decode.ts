/**
 * PNG decode speed: `decodeImagePromise` on RGB PNGs of three sizes (32x32 as
 * the demo's, 224x224, 500x375), encoded once by fast-png from smooth pictures
 * with mild noise (they deflate to about a third, like photos). Prints the
 * median ms an image over `reps` passes; given a second codec module (an
 * earlier data/image_codec.ts), times both interleaved in the same run and
 * prints the ratio.
 *
 *   deno run -A bench/png_decode.ts [reps] [path of another image_codec.ts, relative to bench/]
 */
import { encode } from "fast-png";
import { decodeImagePromise } from "../data/image_codec.ts";
import { rngFor } from "../data/rng.ts";

const reps = Number(Deno.args[0] ?? 9);
type Decode = (bytes: Uint8Array) => Promise<unknown>;
const other: Decode | undefined = Deno.args[1] === undefined
  ? undefined
  : (await import(Deno.args[1])).decodeImagePromise;

/** A smooth picture with noise of ±`noise` (compresses like a photo, not like a flat fill). */
const picture = (width: number, height: number, seed: number, noise = 6): Uint8Array => {
  const rng = rngFor(seed);
  const data = new Uint8Array(width * height * 3);
  const [fx, fy] = [rng.uniform(0.01, 0.1), rng.uniform(0.01, 0.1)];
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      for (let c = 0; c < 3; c++) {
        const v = 128 + 100 * Math.sin(fx * x * (c + 1) + fy * y) + noise * (rng.next() - 0.5);
        data[(y * width + x) * 3 + c] = Math.max(0, Math.min(255, Math.round(v)));
      }
    }
  }
  return data;
};

const median = (xs: number[]) => xs.sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

for (const [width, height, count] of [[32, 32, 256], [224, 224, 32], [500, 375, 16]] as const) {
  const pngs = Array.from(
    { length: count },
    (_, i) => encode({ width, height, data: picture(width, height, i), channels: 3, depth: 8 }),
  );
  const ratio = pngs.reduce((n, p) => n + p.length, 0) / (count * width * height * 3);
  const decoders: [string, Decode][] = [["this build", decodeImagePromise]];
  if (other !== undefined) decoders.push(["other", other]);
  const times = new Map(decoders.map(([name]) => [name, [] as number[]]));
  for (let r = 0; r < reps + 1; r++) {
    for (const [name, decode] of decoders) {
      const start = performance.now();
      for (const bytes of pngs) await decode(bytes);
      if (r > 0) times.get(name)!.push((performance.now() - start) / count); // the first pass warms up
    }
  }
  const mine = median(times.get("this build")!);
  const line = `${width}x${height} (PNG ${(ratio * 100).toFixed(0)}% of raw): this build ${
    mine.toFixed(3)
  } ms`;
  if (other === undefined) console.log(line);
  else {
    const theirs = median(times.get("other")!);
    console.log(`${line}, other ${theirs.toFixed(3)} ms, this/other ${(mine / theirs).toFixed(2)}`);
  }
}
