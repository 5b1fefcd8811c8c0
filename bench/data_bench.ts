/**
 * Decode throughput on ~500x375 JPEGs: per thread (libjpeg-turbo by FFI and
 * imagescript), and through the loader's Worker pool, against PIL measured in
 * the same run by bench/data_reference.py.
 *
 *   npx deno run -A bench/data_bench.ts [count=120] [workers=2]
 */
import { Effect, Stream } from "effect";
import { decodeImagePromise, jpegBackend } from "../data/image_codec.ts";
import { openSource } from "../data/sources.ts";
import { cropPrepare, makeLoader } from "../data/loader.ts";

const count = Number(Deno.args[0] ?? 120);
const maxWorkers = Number(Deno.args[1] ?? 2);
const folder = `${Deno.env.get("TMPDIR") ?? "/tmp"}/swav-bench-jpeg-${count}`;

const python = new Deno.Command("/usr/bin/python3", {
  args: [new URL("./data_reference.py", import.meta.url).pathname, folder, String(count)],
  stdout: "piped",
  stderr: "inherit",
});
const pil = JSON.parse(new TextDecoder().decode((await python.output()).stdout).trim());

const files = [...Deno.readDirSync(folder)].map((e) => `${folder}/${e.name}`).filter((p) =>
  p.endsWith(".jpg")
)
  .sort();
const bytes = files.map((f) => Deno.readFileSync(f));

const rows: Array<{ decoder: string; imagesPerSecond: number }> = [
  { decoder: `${pil.decoder} (python, 1 thread)`, imagesPerSecond: pil.imagesPerSecond },
];

for (const jpeg of ["turbojpeg", "imagescript"] as const) {
  if (jpeg === "turbojpeg" && jpegBackend() !== "turbojpeg") continue;
  for (const b of bytes.slice(0, 5)) await decodeImagePromise(b, { jpeg }); // warm-up
  const start = performance.now();
  for (const b of bytes) await decodeImagePromise(b, { jpeg });
  rows.push({
    decoder: `${jpeg} (main thread)`,
    imagesPerSecond: bytes.length / ((performance.now() - start) / 1000),
  });
}

// Through the loader: read + decode + a cheap centre crop, in a pool of workers.
const source = await Effect.runPromise(openSource(folder));
for (let workers = 1; workers <= maxWorkers; workers++) {
  const seconds = await Effect.runPromise(Effect.scoped(Effect.gen(function* () {
    const loader = yield* makeLoader({
      source,
      prepare: cropPrepare({ size: 32, channels: 3 }, false),
      seed: 0,
      batchSize: 8,
      workers,
      dropLast: false,
    });
    yield* Stream.runDrain(Stream.take(loader.epoch(0), 2)); // warm-up: worker start, module load
    let best = Infinity;
    for (let epoch = 1; epoch <= 3; epoch++) {
      const start = performance.now();
      yield* Stream.runDrain(loader.epoch(epoch));
      best = Math.min(best, (performance.now() - start) / 1000);
    }
    return best;
  })));
  rows.push({
    decoder: `loader, ${workers} worker(s), ${jpegBackend()}`,
    imagesPerSecond: source.length / seconds,
  });
}

console.log(`decode of ${count} JPEGs of 500x375 (${navigator.hardwareConcurrency} cores)`);
console.table(rows.map((r) => ({ ...r, imagesPerSecond: Math.round(r.imagesPerSecond) })));
