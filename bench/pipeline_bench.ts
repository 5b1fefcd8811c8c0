/**
 * The whole data pipeline, files -> decode -> SwAV multi-crop -> batches, in
 * images per second through the loader's Worker pool (1 and 2 workers), next
 * to the SwAV reference's pipeline (PIL + torchvision through a torch
 * DataLoader with as many worker processes, bench/pipeline_reference.py)
 * measured in the same run on the same files.
 *
 *     npx deno run -A bench/pipeline_bench.ts [--jpegs 64] [--pngs 512] [--batch 32] [--passes 3] [--workers 1,2]
 *
 * Cases: (a) 2x224+6x96 (`defaultMulticropConfig`) from 500x375 JPEGs;
 * (b) 2x32 (area 0.14-1, no blur) from 32x32 PNGs. The images are written once
 * by the reference script under runs/bench-data/ (gitignored) and reused.
 *
 * Both sides: main thread/process + N workers, one thread each, batch size as
 * given, shuffled, last batch kept; one warm-up pass (worker start, module
 * load, file cache), then `passes` timed passes; the table shows the best pass
 * of each side (the least disturbed on a shared machine) and their ratio. The
 * consumer stacks each view of a batch into one buffer (`stackView`), the work
 * the reference's default collate does in its workers.
 *
 * A per-image split on this thread (decode alone, multi-crop alone) follows the
 * table, to show where the time goes.
 */
import { Effect, Schema, Stream } from "effect";
import { makeLoader, stackView } from "../data/loader.ts";
import { openSource } from "../data/sources.ts";
import { rngFor } from "../data/rng.ts";
import { decodeImagePromise, jpegBackend, type RgbImage } from "../data/image_codec.ts";
import { MulticropConfig, multicropPrepare, multicropSample } from "../stages/multicrop.ts";

const option = (name: string, fallback: string): string => {
  const at = Deno.args.indexOf(`--${name}`);
  return at >= 0 && at + 1 < Deno.args.length ? Deno.args[at + 1] : fallback;
};
const jpegs = Number(option("jpegs", "64"));
const pngs = Number(option("pngs", "512"));
const batchSize = Number(option("batch", "32"));
const passes = Number(option("passes", "3"));
const workerCounts = option("workers", "1,2").split(",").map(Number);

const root = new URL("../", import.meta.url).pathname;
const dataRoot = `${root}runs/bench-data`;
const jpegFolder = `${dataRoot}/pipeline-jpeg-500x375-${jpegs}`;
const pngFolder = `${dataRoot}/pipeline-png-32-${pngs}`;
const referenceScript = new URL("./pipeline_reference.py", import.meta.url).pathname;

interface Case {
  readonly name: string;
  readonly folder: string;
  readonly config: MulticropConfig;
}

const cases: Case[] = [
  {
    name: "2x224+6x96 from 500x375 JPEG",
    folder: jpegFolder,
    config: Schema.decodeUnknownSync(MulticropConfig)({}),
  },
  {
    name: "2x32 from 32x32 PNG",
    folder: pngFolder,
    config: Schema.decodeUnknownSync(MulticropConfig)({
      nmbCrops: [2],
      sizeCrops: [32],
      minScaleCrops: [0.14],
      maxScaleCrops: [1],
      blur: false,
    }),
  },
];

const text = (bytes: Uint8Array) => new TextDecoder().decode(bytes).trim();

const uptime = async (): Promise<string> => {
  try {
    return text((await new Deno.Command("uptime").output()).stdout);
  } catch {
    return `loadavg ${await Deno.readTextFile("/proc/loadavg").catch(() => "n/a")}`;
  }
};

/** Single-threaded BLAS/OpenMP in the reference, as `torch.set_num_threads(1)` in its workers. */
const pythonEnv = { OMP_NUM_THREADS: "1", MKL_NUM_THREADS: "1", OPENBLAS_NUM_THREADS: "1" };

const python = async (args: string[]): Promise<string> => {
  const output = await new Deno.Command("/usr/bin/python3", { args, env: pythonEnv, stderr: "inherit" })
    .output();
  if (!output.success) throw new Error(`/usr/bin/python3 ${args.join(" ")} exited with ${output.code}`);
  return text(output.stdout);
};

/** Ours: images per second of each timed pass through `makeLoader`. */
const timeOurs = (c: Case, workers: number): Promise<number[]> =>
  Effect.runPromise(Effect.scoped(Effect.gen(function* () {
    const source = yield* openSource(c.folder);
    const loader = yield* makeLoader({
      source,
      prepare: multicropPrepare(c.config),
      seed: 0,
      batchSize,
      workers,
      shuffle: true,
      dropLast: false,
      onError: "fail",
    });
    const crops = c.config.nmbCrops.reduce((a, b) => a + b, 0);
    const pass = (epoch: number) =>
      Effect.gen(function* () {
        const start = performance.now();
        let seen = 0;
        yield* Stream.runForEach(loader.epoch(epoch), (batch) =>
          Effect.sync(() => {
            for (let v = 0; v < crops; v++) stackView(batch, v);
            seen += batch.indices.length;
          }));
        if (seen !== source.length) throw new Error(`pass saw ${seen} of ${source.length} images`);
        return source.length / ((performance.now() - start) / 1000);
      });
    yield* pass(0); // warm-up
    const rates: number[] = [];
    for (let epoch = 1; epoch <= passes; epoch++) rates.push(yield* pass(epoch));
    return rates;
  })));

/** The reference: images per second of each timed pass through a torch DataLoader. */
const timeReference = async (c: Case, workers: number): Promise<number[]> => {
  const out = await python([
    referenceScript,
    "time",
    "--folder",
    c.folder,
    "--workers",
    String(workers),
    "--batch",
    String(batchSize),
    "--passes",
    String(passes),
    "--nmb",
    ...c.config.nmbCrops.map(String),
    "--size",
    ...c.config.sizeCrops.map(String),
    "--min-scale",
    ...c.config.minScaleCrops.map(String),
    "--max-scale",
    ...c.config.maxScaleCrops.map(String),
    ...(c.config.blur ? [] : ["--no-blur"]),
  ]);
  return JSON.parse(out.split("\n").at(-1)!).imagesPerSecond;
};

/** Milliseconds per image on this thread: decode alone, multi-crop alone (after a warm-up). */
const split = async (c: Case, limit: number): Promise<{ decode: number; multicrop: number }> => {
  const files = [...Deno.readDirSync(c.folder)].map((e) => `${c.folder}/${e.name}`).sort().slice(0, limit);
  const bytes = files.map((f) => Deno.readFileSync(f));
  const images: RgbImage[] = [];
  for (const b of bytes.slice(0, 4)) await decodeImagePromise(b);
  let start = performance.now();
  for (const b of bytes) images.push(await decodeImagePromise(b));
  const decode = (performance.now() - start) / bytes.length;
  images.slice(0, 4).forEach((image, i) => multicropSample(image, c.config, rngFor(0, 99, i)));
  start = performance.now();
  images.forEach((image, i) => multicropSample(image, c.config, rngFor(0, 1, i)));
  return { decode, multicrop: (performance.now() - start) / images.length };
};

const best = (rates: number[]) => Math.max(...rates);

const loadBefore = await uptime();
await python([referenceScript, "generate", jpegFolder, String(jpegs), pngFolder, String(pngs)]);

const rows: string[] = [];
const passLog: Record<string, { ours: number[]; reference: number[] }> = {};
for (const c of cases) {
  for (const workers of workerCounts) {
    // Alternate the sides case by case, so a change of load hits both about equally.
    const ours = await timeOurs(c, workers);
    const reference = await timeReference(c, workers);
    passLog[`${c.name}, ${workers} worker(s)`] = {
      ours: ours.map(Math.round),
      reference: reference.map(Math.round),
    };
    const o = best(ours);
    const r = best(reference);
    rows.push(
      `| ${c.name} | ${workers} | ${o.toFixed(1)} | ${(o / workers).toFixed(1)} | ${r.toFixed(1)} | ${
        (r / workers).toFixed(1)
      } | ${(o / r).toFixed(2)} |`,
    );
  }
}
const loadAfter = await uptime();

console.log(
  `pipeline: files -> decode -> multi-crop -> batches of ${batchSize}; ${jpegs} JPEGs, ${pngs} PNGs; ` +
    `best of ${passes} passes after a warm-up; JPEG decoder ${jpegBackend()}; ` +
    `${navigator.hardwareConcurrency} cores visible`,
);
console.log(`uptime before: ${loadBefore}`);
console.log(`uptime after:  ${loadAfter}`);
console.log(
  "\n| case | workers | swav-ts images/s | per worker | torchvision+PIL images/s | per worker | ratio ours/ref |",
);
console.log("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
for (const row of rows) console.log(row);
console.log("\nimages/s of every timed pass:");
for (const [key, value] of Object.entries(passLog)) console.log(`  ${key}: ${JSON.stringify(value)}`);

console.log("\nper image on the main thread (ms): decode alone, multi-crop alone");
for (const c of cases) {
  const s = await split(c, c === cases[0] ? jpegs : Math.min(pngs, 256));
  console.log(
    `  ${c.name}: decode ${s.decode.toFixed(2)}, multicrop ${s.multicrop.toFixed(2)}, ` +
      `sum ${(s.decode + s.multicrop).toFixed(2)} (${(1000 / (s.decode + s.multicrop)).toFixed(0)} images/s)`,
  );
}
