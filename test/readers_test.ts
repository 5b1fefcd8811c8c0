/**
 * Issue 18, the readers: one corrupt JPEG does not break later ones (libjpeg-turbo
 * handle state), decompression bombs are refused from the header (PNG IHDR, JPEG
 * SOF, gzipped IDX), CIFAR labels outside the classes are typed errors, image-named
 * directories / FIFOs / symlink loops are skipped by type (never a hang), the
 * loader names every skipped sample in index order whatever the worker count, and
 * the worker count is capped.
 */
import assert from "node:assert/strict";
import { optionalStep, optionalTest } from "./_optional.ts";
import { Effect, Exit, Stream } from "effect";
import { openTurboJpeg } from "../backend/turbojpeg.ts";
import {
  decodeImage,
  decodeImageResult,
  DEFAULT_MAX_IMAGE_PIXELS,
  type JpegDecoder,
  jpegHeaderSize,
} from "../data/image_codec.ts";
import { encodeIdx, parseIdx } from "../data/idx.ts";
import { encodeCifar } from "../data/cifar.ts";
import { openSource } from "../data/sources.ts";
import { cappedWorkers, cropPrepare, liveWorkers, type LoaderOptions, makeLoader } from "../data/loader.ts";
import { corpusFolder, goodImage, readManifest } from "../bench/corrupt_dataset.ts";

const manifest = await readManifest();
const corpus = (name: string) => Deno.readFile(`${corpusFolder}${name}`);
const fixture = (name: string) => Deno.readFile(new URL(`./fixtures/images/${name}`, import.meta.url));
/**
 * A step per JPEG decoder: imagescript (pure TypeScript) always, libjpeg-turbo where its library loads
 * (an ignored step naming it elsewhere).
 */
const eachJpegDecoder = async (
  t: Deno.TestContext,
  name: string,
  body: (jpeg: JpegDecoder) => Promise<void>,
) => {
  await t.step(`${name} (imagescript)`, () => body("imagescript"));
  await optionalStep(t, `${name} (turbojpeg)`, ["libjpeg-turbo"], () => body("turbojpeg"));
};

/** A seeded shuffle (the same orders on every run). */
const shuffled = <T>(items: readonly T[], seed: number): T[] => {
  const out = [...items];
  let s = seed;
  for (let i = out.length - 1; i > 0; i--) {
    s = (Math.imul(s, 1103515245) + 12345) >>> 0;
    const j = s % (i + 1);
    [out[i], out[j]] = [out[j]!, out[i]!];
  }
  return out;
};

optionalTest("libjpeg-turbo: a corrupt JPEG leaves the next decode exact", ["libjpeg-turbo"], async () => {
  const turbo = openTurboJpeg();
  assert.ok(typeof turbo !== "string", String(turbo));
  const good = await fixture("jpeg_baseline.jpg");
  const alone = turbo.decode(good, DEFAULT_MAX_IMAGE_PIXELS);
  assert.equal(alone.kind, "image");
  const truncated = await corpus("trunc0020.jpg");
  for (const bad of manifest.files.filter((f) => !f.good && f.name.endsWith(".jpg"))) {
    const result = turbo.decode(await corpus(bad.name), DEFAULT_MAX_IMAGE_PIXELS);
    assert.equal(result.kind, "error", bad.name);
    // On the main of issue 18's filing this was "Unsupported marker type ..." from the previous file.
    assert.deepEqual(turbo.decode(good, DEFAULT_MAX_IMAGE_PIXELS), alone, `good JPEG after ${bad.name}`);
    const again = turbo.decode(truncated, DEFAULT_MAX_IMAGE_PIXELS);
    assert.equal(again.kind, "error");
    assert.doesNotMatch(
      again.kind === "error" ? again.reason : "",
      /Unsupported marker/,
      `after ${bad.name}`,
    );
  }
});

Deno.test("the corrupt corpus decoded in one process gives the manifest's verdicts, in any order", async (t) => {
  const files = await Promise.all(manifest.files.map(async (f) => ({ ...f, bytes: await corpus(f.name) })));
  await eachJpegDecoder(t, "the whole corpus", async (jpeg) => {
    // Each good file decoded first, alone: the reference pixels.
    const reference = new Map<string, Uint8Array>();
    for (const f of files.filter((f) => f.good)) {
      const r = await decodeImageResult(f.bytes, { jpeg });
      assert.ok("image" in r, `${f.name} (${jpeg}): ${"reason" in r ? r.reason : ""}`);
      reference.set(f.name, r.image.data);
    }
    for (const seed of [1, 2, 3]) {
      for (const f of shuffled(files, seed)) {
        const r = await decodeImageResult(f.bytes, { jpeg });
        assert.equal(
          "image" in r,
          f.good,
          `${f.name} (${jpeg}, order ${seed}): ${"reason" in r ? r.reason : "decoded"}`,
        );
        if ("image" in r) assert.deepEqual(r.image.data, reference.get(f.name), `${f.name} pixels (${jpeg})`);
      }
    }
  });
});

Deno.test("decompression bombs and zero sizes are refused from the header", async (t) => {
  await t.step("PNG: IHDR read before inflating; the cap is an option", async () => {
    const bomb = await corpus("bomb_20000.png");
    const r = await decodeImageResult(bomb);
    assert.ok("reason" in r);
    assert.match(r.reason, /20000x20000 pixels, over the cap of 89478485/);
    for (const name of ["zero_width.png", "zero_height.png"]) {
      const z = await decodeImageResult(await corpus(name));
      assert.ok("reason" in z && /zero dimension/.test(z.reason), name);
    }
    const small = await fixture("png_rgb8.png");
    const decoded = await decodeImageResult(small);
    assert.ok("image" in decoded);
    const pixels = decoded.image.width * decoded.image.height;
    assert.ok("image" in await decodeImageResult(small, { maxPixels: pixels }));
    const capped = await decodeImageResult(small, { maxPixels: pixels - 1 });
    assert.ok("reason" in capped && /over the cap/.test(capped.reason));
  });
  await eachJpegDecoder(t, "JPEG: SOF read before decoding", async (jpeg) => {
    const huge = await decodeImageResult(await corpus("huge.jpg"), { jpeg });
    assert.ok("reason" in huge && /60000x60000 pixels, over the cap/.test(huge.reason));
    const zero = await decodeImageResult(await corpus("zero_dim.jpg"), { jpeg });
    assert.ok("reason" in zero && /zero dimension/.test(zero.reason));
    // CMYK goes to imagescript whatever the choice: the cap holds there too.
    const cmyk = await corpus("cmyk.jpg");
    const refused = await decodeImageResult(cmyk, { jpeg, maxPixels: 24 * 24 - 1 });
    assert.ok("reason" in refused && /over the cap/.test(refused.reason));
  });
  await t.step("the SOF walk agrees with the decoders on every good JPEG", async () => {
    for (
      const name of ["jpeg_baseline.jpg", "jpeg_progressive.jpg", "jpeg_grey.jpg", "jpeg_baseline444.jpg"]
    ) {
      const bytes = await fixture(name);
      const image = await Effect.runPromise(decodeImage(bytes, name));
      assert.deepEqual(jpegHeaderSize(bytes), { width: image.width, height: image.height }, name);
    }
  });
});

/** Gzip of `header` followed by `zeros` zero bytes, compressed as a stream (never materialised whole). */
const gzipWithZeros = async (header: Uint8Array, zeros: number): Promise<Uint8Array> => {
  const chunk = new Uint8Array(1 << 20);
  const source = new ReadableStream<Uint8Array<ArrayBuffer>>({
    start(controller) {
      controller.enqueue(header as Uint8Array<ArrayBuffer>);
      for (let left = zeros; left > 0; left -= chunk.length) {
        controller.enqueue(left >= chunk.length ? chunk : chunk.slice(0, left));
      }
      controller.close();
    },
  });
  return new Uint8Array(await new Response(source.pipeThrough(new CompressionStream("gzip"))).arrayBuffer());
};

const idxFailure = async (bytes: Uint8Array): Promise<string> => {
  const exit = await Effect.runPromiseExit(parseIdx(bytes, "x-idx3-ubyte.gz"));
  assert.ok(Exit.isFailure(exit), "expected an IdxError");
  const failure = exit.cause.reasons.find((r) => r._tag === "Fail");
  assert.ok(failure?._tag === "Fail" && failure.error._tag === "IdxError");
  assert.equal(failure.error.path, "x-idx3-ubyte.gz");
  return failure.error.reason;
};

Deno.test("gzipped IDX: inflation stops past the size the header promises; trailing bytes are an error", async () => {
  const header = (await encodeIdx([10, 2, 2], new Uint8Array(40))).subarray(0, 16);
  // 256 MB of zeros behind a header promising 40 bytes: about 250 KB of gzip.
  const bomb = await gzipWithZeros(header, 256 << 20);
  const before = Deno.memoryUsage().rss;
  const started = performance.now();
  assert.match(await idxFailure(bomb), /inflates past the 56 bytes its header promises/);
  assert.ok(performance.now() - started < 5000, "stopped early, not inflated whole");
  assert.ok(Deno.memoryUsage().rss - before < 128 << 20, "the bomb was not inflated into memory");
  // A header promising more than the cap is refused before its data.
  const over = new Uint8Array(16);
  over.set([0, 0, 8, 3]);
  new DataView(over.buffer).setUint32(4, 0xffffffff);
  new DataView(over.buffer).setUint32(8, 1000);
  new DataView(over.buffer).setUint32(12, 1000);
  assert.match(await idxFailure(await gzipWithZeros(over, 1 << 20)), /over the cap/);
  // Trailing bytes, raw or gzipped.
  const exact = await encodeIdx([10, 2, 2], new Uint8Array(40));
  const trailing = new Uint8Array(exact.length + 3);
  trailing.set(exact);
  assert.match(await idxFailure(trailing), /3 bytes after the 40 bytes/);
  assert.match(await idxFailure(await gzipWithZeros(exact, 3)), /inflates past/);
  // The exact file still parses, gzipped or not.
  for (const gzip of [false, true]) {
    const ok = await Effect.runPromise(
      parseIdx(await encodeIdx([10, 2, 2], new Uint8Array(40).fill(7), gzip)),
    );
    assert.deepEqual(ok.dims, [10, 2, 2]);
    assert.equal(ok.data.length, 40);
  }
});

Deno.test("CIFAR: a label outside the classes is a SourceError naming the file and record", async () => {
  const dir = await Deno.makeTempDir({ prefix: "swav-cifar-bad-" });
  try {
    const image = { width: 32, height: 32, data: new Uint8Array(32 * 32 * 3) };
    await Deno.writeFile(`${dir}/data_batch_1.bin`, encodeCifar("cifar10", [{ image, label: 3 }]));
    await Deno.writeFile(
      `${dir}/data_batch_2.bin`,
      encodeCifar("cifar10", [{ image, label: 1 }, { image, label: 9 }, { image, label: 255 }]),
    );
    const exit = await Effect.runPromiseExit(openSource(dir));
    assert.ok(Exit.isFailure(exit));
    const failure = exit.cause.reasons.find((r) => r._tag === "Fail");
    assert.ok(failure?._tag === "Fail" && failure.error._tag === "SourceError");
    assert.equal(failure.error.path, `${dir}/data_batch_2.bin`);
    assert.match(failure.error.reason, /record 2 has label 255, outside cifar10's 0\.\.9/);

    await Deno.remove(`${dir}/data_batch_1.bin`);
    await Deno.remove(`${dir}/data_batch_2.bin`);
    await Deno.writeFile(`${dir}/train.bin`, encodeCifar("cifar100", [{ image, label: 99, coarse: 19 }]));
    assert.equal((await Effect.runPromise(openSource(dir))).length, 1, "labels 99 / 19 are CIFAR-100's last");
    await Deno.writeFile(`${dir}/train.bin`, encodeCifar("cifar100", [{ image, label: 100, coarse: 1 }]));
    const hundred = await Effect.runPromiseExit(openSource(dir));
    assert.ok(Exit.isFailure(hundred));
    assert.match(String(hundred.cause), /record 0 has label 100, outside cifar100's 0\.\.99/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

/** A class folder of good images mixed with special files named like images. */
const specialFolder = async () => {
  const dir = await Deno.makeTempDir({ prefix: "swav-special-" });
  for (const name of ["a", "b"]) await Deno.mkdir(`${dir}/${name}`);
  for (let i = 0; i < 6; i++) {
    await Deno.writeFile(`${dir}/a/good-${i}.png`, await goodImage(0, i, 16, "png"));
    await Deno.writeFile(`${dir}/b/good-${i}.jpg`, await goodImage(1, i, 16, "jpg"));
  }
  await Deno.mkdir(`${dir}/a/dir.png`);
  const made = await new Deno.Command("mkfifo", { args: [`${dir}/b/fifo.png`] }).output();
  assert.ok(made.success, "mkfifo");
  await Deno.symlink("loop.jpg", `${dir}/a/loop.jpg`);
  await Deno.symlink("/dev/zero", `${dir}/b/zero.jpg`);
  // A symlink to a good image elsewhere is followed.
  await Deno.writeFile(`${dir}/outside.png`, await goodImage(0, 99, 16, "png"));
  await Deno.symlink(`${dir}/outside.png`, `${dir}/a/linked.png`);
  await Deno.writeFile(`${dir}/b/zz_bad.jpg`, await corpus("header17_random.jpg"));
  return dir;
};

const bad = ["a/dir.png", "a/loop.jpg", "b/fifo.png", "b/zero.jpg", "b/zz_bad.jpg"];

Deno.test("image folders: directories, FIFOs, symlink loops and devices named like images are skipped by type", async () => {
  const dir = await specialFolder();
  try {
    const source = await Effect.runPromise(openSource(dir));
    assert.equal(source.length, 6 + 6 + 1 + bad.length);
    const reasons = new Map<string, string>();
    const started = performance.now();
    for (let i = 0; i < source.length; i++) {
      const exit = await Effect.runPromiseExit(source.read(i));
      if (Exit.isFailure(exit)) {
        const failure = exit.cause.reasons.find((r) => r._tag === "Fail");
        assert.ok(failure?._tag === "Fail" && failure.error._tag === "DecodeError");
        reasons.set(failure.error.path.slice(dir.length + 1), failure.error.reason);
      }
    }
    assert.ok(performance.now() - started < 10_000, "never blocks");
    assert.deepEqual([...reasons.keys()].sort(), bad);
    assert.match(reasons.get("a/dir.png")!, /not a regular file \(a directory\)/);
    assert.match(reasons.get("b/fifo.png")!, /not a regular file \(a FIFO\)/);
    assert.match(reasons.get("b/zero.jpg")!, /not a regular file \(a character device\)/);
    assert.match(reasons.get("a/loop.jpg")!, /cannot read file: .*(symbolic links|loop)/i);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("loader: every skipped sample named, in index order, the same at any worker count", async () => {
  const dir = await specialFolder();
  try {
    const source = await Effect.runPromise(openSource(dir));
    const run = (workers: number, epochs: number) =>
      Effect.runPromise(Effect.scoped(Effect.gen(function* () {
        const options: LoaderOptions = {
          source,
          prepare: cropPrepare({ size: 8, channels: 3 }),
          seed: 3,
          batchSize: 2,
          workers,
          maxWorkers: 3,
        };
        const loader = yield* makeLoader(options);
        let samples = 0;
        for (let epoch = 0; epoch < epochs; epoch++) {
          yield* Stream.runForEach(loader.epoch(epoch), (b) =>
            Effect.sync(() => (samples += b.indices.length)));
        }
        return { samples, report: yield* loader.skipped };
      })));
    const reference = await run(0, 2);
    assert.equal(reference.samples, 2 * 12, "13 good samples, batches of 2, last dropped: 12 per epoch");
    assert.equal(reference.report.count, 2 * bad.length, "each bad sample skipped once per epoch");
    assert.deepEqual(reference.report.samples.map((s) => s.path.slice(dir.length + 1)), bad, "index order");
    assert.deepEqual(
      reference.report.samples.map((s) => s.index),
      [...reference.report.samples.map((s) => s.index)].sort((a, b) => a - b),
    );
    assert.ok(reference.report.samples.every((s) => s.epoch === 0 && s.reason.length > 0));
    for (const workers of [1, 3]) assert.deepEqual(await run(workers, 2), reference, `workers ${workers}`);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("loader: the worker count is capped at the core count with a warning", () => {
  assert.deepEqual(cappedWorkers(64, 2), {
    workers: 2,
    warning: "workers: 64 requested, capped at 2 (the number of CPU cores; more cannot decode faster)",
  });
  assert.deepEqual(cappedWorkers(2, 2), { workers: 2 });
  assert.deepEqual(cappedWorkers(0, 2), { workers: 0 });
});

Deno.test("loader: more workers than cores start only as many as there are cores", async () => {
  const cores = navigator.hardwareConcurrency;
  const dir = await specialFolder();
  try {
    const source = await Effect.runPromise(openSource(dir));
    const started = await Effect.runPromise(Effect.scoped(Effect.gen(function* () {
      yield* makeLoader({
        source,
        prepare: cropPrepare({ size: 8, channels: 3 }),
        seed: 0,
        batchSize: 2,
        workers: cores + 2,
      });
      return liveWorkers();
    })));
    assert.equal(started, cores);
    assert.equal(liveWorkers(), 0);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
