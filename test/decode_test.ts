/**
 * decode: pixel agreement with PIL on committed fixtures (reference/decode_reference.py),
 * and every bad-input case giving a typed DecodeError that names the path.
 *
 * Tolerances: PNG must match PIL exactly (16-bit: round(v / 257)); JPEG mean
 * absolute difference below 3 (the fixture manifest states it per case).
 */
import assert from "node:assert/strict";
import { optionalStep } from "./_optional.ts";
import { Effect, Exit, Option } from "effect";
import { configure } from "../stages/stage.ts";
import { decodeStage } from "../stages/decode.ts";
import { DecodeError, decodeImage, type JpegDecoder, readImage, type RgbImage } from "../data/image_codec.ts";

const FIXTURES = new URL("./fixtures/images/", import.meta.url);

interface Case {
  name: string;
  file: string;
  width: number;
  height: number;
  meanAbsTolerance: number;
}
const manifest: { cases: Case[] } = JSON.parse(await Deno.readTextFile(new URL("expected.json", FIXTURES)));
const fixture = (file: string) => Deno.readFile(new URL(file, FIXTURES));

/**
 * A step per JPEG decoder: imagescript (pure TypeScript) always, libjpeg-turbo where its library loads
 * (an ignored step naming it elsewhere).
 */
const eachJpegDecoder = async (
  t: Deno.TestContext,
  name: string,
  body: (jpeg: JpegDecoder, t: Deno.TestContext) => Promise<void>,
) => {
  await t.step(`${name} (imagescript)`, (t) => body("imagescript", t));
  await optionalStep(t, `${name} (turbojpeg)`, ["libjpeg-turbo"], (t) => body("turbojpeg", t));
};

const failure = async <A>(effect: Effect.Effect<A, DecodeError>): Promise<DecodeError> => {
  const exit = await Effect.runPromiseExit(effect);
  assert.ok(Exit.isFailure(exit), "expected a DecodeError, got a success");
  const error = exit.cause.reasons.find((r) => r._tag === "Fail");
  assert.ok(error && error._tag === "Fail", `expected a typed failure, got ${String(exit.cause)}`);
  assert.ok(error.error instanceof DecodeError);
  assert.equal(error.error._tag, "DecodeError");
  return error.error;
};

Deno.test("decode matches PIL on fixtures", async (t) => {
  assert.ok(manifest.cases.length >= 15, "fixture manifest is incomplete");
  await eachJpegDecoder(t, "every fixture", async (jpeg, t) => {
    for (const c of manifest.cases) {
      await t.step(`${c.name} (${c.file.endsWith(".jpg") ? jpeg : "png"})`, async () => {
        const image: RgbImage = await Effect.runPromise(decodeImage(await fixture(c.file), c.file, { jpeg }));
        const expected = await fixture(`${c.name}.rgb`);
        assert.equal(image.width, c.width);
        assert.equal(image.height, c.height);
        assert.equal(image.data.length, c.width * c.height * 3);
        let total = 0;
        let worst = 0;
        for (let i = 0; i < expected.length; i++) {
          const d = Math.abs(image.data[i] - expected[i]);
          total += d;
          worst = Math.max(worst, d);
        }
        const mean = total / expected.length;
        if (c.meanAbsTolerance === 0) {
          assert.equal(worst, 0, `${c.name}: max |diff| ${worst}, expected exact`);
        } else {assert.ok(
            mean < c.meanAbsTolerance,
            `${c.name}: mean |diff| ${mean} >= ${c.meanAbsTolerance}`,
          );}
      });
    }
  });
});

Deno.test("PNG round trip on fresh random images of every colour type and depth", async () => {
  // Random images, random row filters, written by a minimal encoder here and decoded by decodeImage;
  // 16-bit samples must come back as round(v / 257), low depths as PIL scales them (v * 255 / max).
  const configs: Array<[colour: number, depth: number]> = [
    [0, 1],
    [0, 2],
    [0, 4],
    [0, 8],
    [0, 16],
    [2, 8],
    [2, 16],
    [3, 2],
    [3, 8],
    [4, 8],
    [4, 16],
    [6, 8],
    [6, 16],
  ];
  for (const [colour, depth] of configs) {
    const width = 1 + Math.floor(Math.random() * 20);
    const height = 1 + Math.floor(Math.random() * 12);
    const { png, expected } = await randomPng(width, height, colour, depth);
    const image = await Effect.runPromise(decodeImage(png, `random-${colour}-${depth}.png`));
    assert.equal(image.width, width);
    assert.equal(image.height, height);
    assert.deepEqual(image.data, expected, `colour type ${colour}, depth ${depth}, ${width}x${height}`);
  }
});

Deno.test("bad input gives a typed DecodeError naming the path", async (t) => {
  const dir = await Deno.makeTempDir({ prefix: "swav-decode-" });
  try {
    const png = await fixture("png_rgb8.png");
    const jpeg = await fixture("jpeg_baseline.jpg");
    const progressive = await fixture("jpeg_progressive.jpg");

    await t.step("truncated PNG", async () => {
      for (const cut of [20, Math.floor(png.length / 2), png.length - 5]) {
        const error = await failure(decodeImage(png.subarray(0, cut), "cut.png"));
        assert.equal(error.path, "cut.png");
        assert.match(error.reason, /truncated|corrupt/);
      }
    });
    await t.step("corrupt PNG (flipped byte in image data)", async () => {
      const bad = png.slice();
      bad[Math.floor(bad.length / 2)] ^= 0x55;
      assert.match((await failure(decodeImage(bad, "flip.png"))).reason, /CRC/);
    });
    await eachJpegDecoder(t, "truncated JPEG", async (jpegDecoder) => {
      for (const [bytes, name] of [[jpeg, "base.jpg"], [progressive, "prog.jpg"]] as const) {
        for (const cut of [Math.floor(bytes.length / 2), bytes.length - 2]) {
          const error = await failure(decodeImage(bytes.subarray(0, cut), name, { jpeg: jpegDecoder }));
          assert.equal(error.path, name);
          assert.match(error.reason, /truncated|corrupt|end/i);
        }
      }
    });
    await t.step("random bytes with a .png extension", async () => {
      const path = `${dir}/noise.png`;
      await Deno.writeFile(path, crypto.getRandomValues(new Uint8Array(512)));
      const error = await failure(readImage(path));
      assert.equal(error.path, path);
      assert.match(error.reason, /unrecognised image format/);
    });
    await t.step("empty file", async () => {
      const path = `${dir}/empty.jpg`;
      await Deno.writeFile(path, new Uint8Array(0));
      assert.match((await failure(readImage(path))).reason, /empty/);
    });
    await t.step("missing and unreadable files", async () => {
      const missing = `${dir}/nope.png`;
      const error = await failure(readImage(missing));
      assert.equal(error.path, missing);
      assert.match(error.reason, /cannot read file/);
      // A directory cannot be read as a file, even by root (chmod 000 does not stop root).
      const folder = `${dir}/folder.png`;
      await Deno.mkdir(folder);
      assert.match((await failure(readImage(folder))).reason, /cannot read file/);
    });
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("decodeStage: skip gives none, fail gives the error, defaults to skip", async () => {
  const good = { path: "good.png", bytes: await fixture("png_grey8.png") };
  const bad = { path: "bad.png", bytes: new Uint8Array([1, 2, 3, 4]) };
  const skip = await Effect.runPromise(configure(decodeStage, {}));
  const decoded = await Effect.runPromise(skip(good));
  assert.ok(Option.isSome(decoded));
  assert.equal(decoded.value.width, 33);
  assert.ok(Option.isNone(await Effect.runPromise(skip(bad))));
  const fail = await Effect.runPromise(configure(decodeStage, { onError: "fail" }));
  assert.equal((await failure(fail(bad))).path, "bad.png");
  const wrong = await Effect.runPromiseExit(configure(decodeStage, { onError: "ignore" }));
  assert.ok(Exit.isFailure(wrong), "an unknown policy must be rejected");
});

// ---------------------------------------------------------------------------------------------
// A minimal PNG encoder for the round-trip test.

const crcTable = Array.from({ length: 256 }, (_, n) => {
  let c = n;
  for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  return c >>> 0;
});
const crc = (bytes: Uint8Array) => {
  let c = 0xffffffff;
  for (const b of bytes) c = crcTable[(c ^ b) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
};
const chunk = (type: string, data: Uint8Array) => {
  const out = new Uint8Array(12 + data.length);
  const view = new DataView(out.buffer);
  view.setUint32(0, data.length);
  out.set(new TextEncoder().encode(type), 4);
  out.set(data, 8);
  view.setUint32(8 + data.length, crc(out.subarray(4, 8 + data.length)));
  return out;
};
const zlib = async (data: Uint8Array) =>
  new Uint8Array(
    await new Response(
      new Blob([data as Uint8Array<ArrayBuffer>]).stream().pipeThrough(new CompressionStream("deflate")),
    ).arrayBuffer(),
  );

const randomPng = async (width: number, height: number, colour: number, depth: number) => {
  const channels = { 0: 1, 2: 3, 3: 1, 4: 2, 6: 4 }[colour]!;
  const max = (1 << depth) - 1;
  const paletteSize = colour === 3 ? 1 + Math.floor(Math.random() * (max + 1)) : 0;
  const palette = crypto.getRandomValues(new Uint8Array(paletteSize * 3));
  const samples = Array.from(
    { length: width * height * channels },
    () => Math.floor(Math.random() * (colour === 3 ? paletteSize : max + 1)),
  );
  const expected = new Uint8Array(width * height * 3);
  for (let p = 0; p < width * height; p++) {
    const s = (c: number) => samples[p * channels + c];
    const to8 = (v: number) => depth === 16 ? Math.round(v / 257) : depth < 8 ? (v * 255) / max : v;
    const rgb = colour === 3
      ? [palette[s(0) * 3], palette[s(0) * 3 + 1], palette[s(0) * 3 + 2]]
      : colour === 0 || colour === 4
      ? [to8(s(0)), to8(s(0)), to8(s(0))]
      : [to8(s(0)), to8(s(1)), to8(s(2))];
    expected.set(rgb, p * 3);
  }
  // Pack rows (MSB first for sub-byte depths), then filter each with a random filter type.
  const rowBytes = Math.ceil((width * channels * depth) / 8);
  const bpp = Math.max(1, (channels * depth) >> 3);
  const raw = new Uint8Array(height * (rowBytes + 1));
  let previous = new Uint8Array(rowBytes);
  for (let y = 0; y < height; y++) {
    const row = new Uint8Array(rowBytes);
    for (let i = 0; i < width * channels; i++) {
      const v = samples[y * width * channels + i];
      if (depth === 16) {
        row[2 * i] = v >> 8;
        row[2 * i + 1] = v & 0xff;
      } else if (depth === 8) row[i] = v;
      else row[(i * depth) >> 3] |= v << (8 - depth - ((i * depth) & 7));
    }
    const filter = Math.floor(Math.random() * 5);
    const base = y * (rowBytes + 1);
    raw[base] = filter;
    for (let i = 0; i < rowBytes; i++) {
      const a = i >= bpp ? row[i - bpp] : 0;
      const b = previous[i];
      const c = i >= bpp ? previous[i - bpp] : 0;
      const pa = Math.abs(b - c), pb = Math.abs(a - c), pc = Math.abs(a + b - 2 * c);
      const predictor = [0, a, b, (a + b) >> 1, pa <= pb && pa <= pc ? a : pb <= pc ? b : c][filter];
      raw[base + 1 + i] = (row[i] - predictor) & 0xff;
    }
    previous = row;
  }
  const ihdr = new Uint8Array(13);
  new DataView(ihdr.buffer).setUint32(0, width);
  new DataView(ihdr.buffer).setUint32(4, height);
  ihdr.set([depth, colour, 0, 0, 0], 8);
  const parts = [
    new Uint8Array([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]),
    chunk("IHDR", ihdr),
    ...(colour === 3 ? [chunk("PLTE", palette)] : []),
    chunk("IDAT", await zlib(raw)),
    chunk("IEND", new Uint8Array(0)),
  ];
  const png = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    png.set(p, at);
    at += p.length;
  }
  return { png, expected };
};
