/**
 * Data sources: detection and readers on tiny data sets written here in a temp
 * folder (IDX raw and gzipped, CIFAR-10/100 binary, class folders, ImageNet-style
 * splits, flat folders), and the clear errors for missing or malformed sources.
 */
import assert from "node:assert/strict";
import { optionalTest } from "./_optional.ts";
import { FASHION_MNIST_PATH } from "../pipelines/environment.ts";
import { Effect, Exit } from "effect";
import { openSource, parseSourceSpec, type Sample, SourceError } from "../data/sources.ts";
import { encodeIdx } from "../data/idx.ts";
import { DecodeError } from "../data/image_codec.ts";

const FIXTURES = new URL("./fixtures/images/", import.meta.url);
const run = <A, E>(effect: Effect.Effect<A, E>) => Effect.runPromise(effect);

const failureOf = async <E>(effect: Effect.Effect<unknown, E>): Promise<E> => {
  const exit = await Effect.runPromiseExit(effect);
  assert.ok(Exit.isFailure(exit), "expected a failure");
  const reason = exit.cause.reasons.find((r) => r._tag === "Fail");
  assert.ok(reason && reason._tag === "Fail", `expected a typed failure, got ${String(exit.cause)}`);
  return reason.error;
};

const randomBytes = (n: number) => {
  const out = new Uint8Array(n);
  for (let i = 0; i < n; i += 65536) crypto.getRandomValues(out.subarray(i, Math.min(n, i + 65536)));
  return out;
};

const withTempDir = async (body: (dir: string) => Promise<void>) => {
  const dir = await Deno.makeTempDir({ prefix: "swav-sources-" });
  try {
    await body(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
};

Deno.test("parseSourceSpec splits the :train / :test / :val suffix", () => {
  assert.deepEqual(parseSourceSpec("/data/x"), { path: "/data/x", split: "train" });
  assert.deepEqual(parseSourceSpec("/data/x:test"), { path: "/data/x", split: "test" });
  assert.deepEqual(parseSourceSpec("/data/x:val"), { path: "/data/x", split: "test" });
  assert.deepEqual(parseSourceSpec("rel/dir:train"), { path: "rel/dir", split: "train" });
});

Deno.test("IDX folders, raw and gzipped, both splits", async () => {
  for (const gzip of [false, true]) {
    await withTempDir(async (dir) => {
      const suffix = gzip ? ".gz" : "";
      const splits = { train: { n: 7, prefix: "train" }, test: { n: 3, prefix: "t10k" } };
      const written: Record<string, { pixels: Uint8Array; labels: Uint8Array }> = {};
      const [height, width] = [5, 4];
      for (const [split, { n, prefix }] of Object.entries(splits)) {
        const pixels = randomBytes(n * height * width);
        const labels = Uint8Array.from({ length: n }, () => Math.floor(Math.random() * 10));
        written[split] = { pixels, labels };
        await Deno.writeFile(
          `${dir}/${prefix}-images-idx3-ubyte${suffix}`,
          await encodeIdx([n, height, width], pixels, gzip),
        );
        await Deno.writeFile(
          `${dir}/${prefix}-labels-idx1-ubyte${suffix}`,
          await encodeIdx([n], labels, gzip),
        );
      }
      for (const split of ["train", "test"] as const) {
        const source = await run(openSource(split === "train" ? dir : `${dir}:test`));
        assert.equal(source.kind, "idx");
        assert.equal(source.split, split);
        assert.equal(source.channels, 1);
        assert.equal(source.length, splits[split].n);
        for (let i = 0; i < source.length; i++) {
          const { image, label } = await run(source.read(i));
          assert.equal(label, written[split].labels[i]);
          assert.equal(image.width, width);
          assert.equal(image.height, height);
          for (let p = 0; p < width * height; p++) {
            const grey = written[split].pixels[i * width * height + p];
            assert.deepEqual([...image.data.subarray(3 * p, 3 * p + 3)], [grey, grey, grey]);
          }
        }
        const outside = await failureOf(source.read(source.length));
        assert.ok(outside instanceof DecodeError);
      }
    });
  }
});

Deno.test("IDX: truncated and mismatched files give a SourceError naming the file", async () => {
  await withTempDir(async (dir) => {
    const full = await encodeIdx([4, 3, 3], randomBytes(36));
    await Deno.writeFile(`${dir}/train-images-idx3-ubyte`, full.subarray(0, full.length - 5));
    await Deno.writeFile(`${dir}/train-labels-idx1-ubyte`, await encodeIdx([4], new Uint8Array(4)));
    const error = await failureOf(openSource(dir));
    assert.ok(error instanceof SourceError);
    assert.equal(error.path, `${dir}/train-images-idx3-ubyte`);
    assert.match(error.reason, /truncated/);
    await Deno.writeFile(`${dir}/train-images-idx3-ubyte`, full);
    await Deno.writeFile(`${dir}/train-labels-idx1-ubyte`, await encodeIdx([5], new Uint8Array(5)));
    assert.match((await failureOf(openSource(dir))).reason, /shapes do not match/);
    assert.match((await failureOf(openSource(`${dir}:test`))).reason, /t10k-images/);
  });
});

/** Planar CIFAR record written independently of data/cifar.ts: label byte(s), R plane, G plane, B plane. */
const cifarRecord = (labels: number[], hwc: Uint8Array) => {
  const out = new Uint8Array(labels.length + 3072);
  out.set(labels, 0);
  for (let y = 0; y < 32; y++) {
    for (let x = 0; x < 32; x++) {
      for (let c = 0; c < 3; c++) out[labels.length + c * 1024 + y * 32 + x] = hwc[(y * 32 + x) * 3 + c];
    }
  }
  return out;
};

Deno.test("CIFAR-10 batches (in batch order) and CIFAR-100 fine labels", async () => {
  await withTempDir(async (dir) => {
    // Batches named out of order on purpose: data_batch_10 must come after data_batch_2.
    const images = Array.from({ length: 5 }, () => randomBytes(3072));
    const labels = [3, 1, 4, 1, 5];
    const records = images.map((image, i) => cifarRecord([labels[i]], image));
    await Deno.writeFile(`${dir}/data_batch_2.bin`, new Uint8Array([...records[0], ...records[1]]));
    await Deno.writeFile(`${dir}/data_batch_10.bin`, new Uint8Array([...records[2], ...records[3]]));
    await Deno.writeFile(`${dir}/test_batch.bin`, records[4]);
    await Deno.writeTextFile(
      `${dir}/batches.meta.txt`,
      "airplane\nautomobile\nbird\ncat\ndeer\ndog\nfrog\nhorse\nship\ntruck\n",
    );
    const train = await run(openSource(dir));
    assert.equal(train.kind, "cifar10");
    assert.equal(train.length, 4);
    assert.equal(train.classes?.[3], "cat");
    for (let i = 0; i < 4; i++) {
      const sample: Sample = await run(train.read(i));
      assert.equal(sample.label, labels[i]);
      assert.deepEqual(sample.image.data, images[i]);
    }
    const test = await run(openSource(`${dir}:test`));
    assert.equal(test.length, 1);
    assert.deepEqual((await run(test.read(0))).image.data, images[4]);
  });
  await withTempDir(async (dir) => {
    const images = Array.from({ length: 3 }, () => randomBytes(3072));
    await Deno.writeFile(
      `${dir}/train.bin`,
      new Uint8Array(images.flatMap((image, i) => [...cifarRecord([i, 90 + i], image)])),
    );
    await Deno.writeFile(`${dir}/test.bin`, cifarRecord([7, 77], images[0]));
    const train = await run(openSource(dir));
    assert.equal(train.kind, "cifar100");
    assert.equal(train.channels, 3);
    assert.deepEqual(await Promise.all([0, 1, 2].map(async (i) => (await run(train.read(i))).label)), [
      90,
      91,
      92,
    ]);
    assert.deepEqual((await run(train.read(2))).image.data, images[2]);
    assert.equal((await run((await run(openSource(`${dir}:test`))).read(0))).label, 77);
    // A record file of the wrong size is not silently misread.
    await Deno.writeFile(`${dir}/train.bin`, randomBytes(3074 * 2 + 5).fill(1, 0, 1));
    assert.match((await failureOf(openSource(dir))).reason, /not a multiple/);
  });
});

Deno.test("image folders: classes, ImageNet-style splits, flat folders, bad files", async () => {
  await withTempDir(async (dir) => {
    const png = await Deno.readFile(new URL("png_rgb8.png", FIXTURES));
    const jpeg = await Deno.readFile(new URL("jpeg_baseline.jpg", FIXTURES));
    // Class folders (one nested deeper), labels = sorted folder names.
    await Deno.mkdir(`${dir}/classes/zebra/sub`, { recursive: true });
    await Deno.mkdir(`${dir}/classes/ant`, { recursive: true });
    await Deno.mkdir(`${dir}/classes/empty`, { recursive: true });
    await Deno.writeFile(`${dir}/classes/zebra/b.png`, png);
    await Deno.writeFile(`${dir}/classes/zebra/sub/a.JPG`, jpeg);
    await Deno.writeFile(`${dir}/classes/ant/x.jpeg`, jpeg);
    await Deno.writeTextFile(`${dir}/classes/ant/notes.txt`, "not an image");
    const classes = await run(openSource(`${dir}/classes`));
    assert.equal(classes.kind, "folder");
    assert.deepEqual(classes.classes, ["ant", "zebra"]);
    assert.equal(classes.length, 3);
    const labels = await Promise.all([0, 1, 2].map(async (i) => (await run(classes.read(i))).label));
    assert.deepEqual(labels, [0, 1, 1]);
    assert.equal((await run(classes.read(1))).image.width, 33);
    assert.match((await failureOf(openSource(`${dir}/classes:test`))).reason, /no test split/);

    // ImageNet layout: val lacks "cat", labels still agree with train.
    for (const p of ["train/cat", "train/dog", "val/dog"]) {
      await Deno.mkdir(`${dir}/imnet/${p}`, { recursive: true });
    }
    await Deno.writeFile(`${dir}/imnet/train/cat/1.png`, png);
    await Deno.writeFile(`${dir}/imnet/train/dog/2.png`, png);
    await Deno.writeFile(`${dir}/imnet/val/dog/3.jpg`, jpeg);
    const train = await run(openSource(`${dir}/imnet:train`));
    const val = await run(openSource(`${dir}/imnet:test`));
    assert.deepEqual(train.classes, ["cat", "dog"]);
    assert.deepEqual(val.classes, ["cat", "dog"]);
    assert.equal(train.length, 2);
    assert.equal(val.length, 1);
    assert.equal((await run(val.read(0))).label, 1);

    // Flat folder: unlabelled; a corrupt file is a DecodeError at read time naming it.
    await Deno.mkdir(`${dir}/flat`);
    await Deno.writeFile(`${dir}/flat/a.png`, png);
    await Deno.writeFile(`${dir}/flat/b.png`, randomBytes(300));
    const flat = await run(openSource(`${dir}/flat`));
    assert.equal(flat.kind, "flat");
    assert.equal(flat.classes, undefined);
    assert.equal((await run(flat.read(0))).label, -1);
    const bad = await failureOf(flat.read(1));
    assert.ok(bad instanceof DecodeError);
    assert.equal(bad.path, `${dir}/flat/b.png`);
    // A file deleted after listing: the read fails with the path, the source stays usable.
    await Deno.remove(`${dir}/flat/b.png`);
    assert.match((await failureOf(flat.read(1))).reason, /cannot read file/);
    assert.equal((await run(flat.read(0))).image.height, 21);
  });
});

Deno.test("missing, empty and non-folder sources give a SourceError naming the path", async () => {
  await withTempDir(async (dir) => {
    const missing = await failureOf(openSource(`${dir}/does-not-exist:train`));
    assert.ok(missing instanceof SourceError);
    assert.equal(missing._tag, "SourceError");
    assert.equal(missing.path, `${dir}/does-not-exist`);
    assert.match(missing.reason, /no such folder/);
    assert.match((await failureOf(openSource(dir))).reason, /no data found/);
    await Deno.writeTextFile(`${dir}/file.txt`, "x");
    assert.match((await failureOf(openSource(`${dir}/file.txt`))).reason, /not a folder/);
  });
});

const FASHION = FASHION_MNIST_PATH;

optionalTest("Fashion-MNIST from Debian's dataset-fashion-mnist", ["fashion-mnist"], async () => {
  const test = await run(openSource(`${FASHION}:test`));
  assert.equal(test.kind, "idx");
  assert.equal(test.length, 10000);
  assert.equal(test.channels, 1);
  const first = await run(test.read(0));
  assert.equal(first.image.width, 28);
  assert.equal(first.label, 9); // the first test image is an ankle boot
  assert.equal((await run(test.read(1))).label, 2);
});
