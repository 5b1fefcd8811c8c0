/**
 * PNG image data is inflated no further than the header's size (a
 * decompression bomb stops there and the declared image decodes, as PIL
 * decodes it), and the one-pass unfilter of 8-bit images matches PNG's filter
 * definitions on every filter type, against an encoder written here.
 */
import assert from "node:assert/strict";
import { zlibSync } from "fflate";
import { decodeImagePromise } from "../data/image_codec.ts";
import { boundPng, pngScanlineBytes } from "../data/png_bounded.ts";
import { rngFor } from "../data/rng.ts";

let crcTable: Uint32Array | undefined;
const crc32 = (bytes: Uint8Array): number => {
  crcTable ??= Uint32Array.from({ length: 256 }, (_, n) => {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    return c >>> 0;
  });
  let c = 0xffffffff;
  for (const b of bytes) c = crcTable[(c ^ b) & 0xff]! ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
};

const chunk = (type: string, data: Uint8Array): Uint8Array => {
  const out = new Uint8Array(12 + data.length);
  const view = new DataView(out.buffer);
  view.setUint32(0, data.length);
  out.set(new TextEncoder().encode(type), 4);
  out.set(data, 8);
  view.setUint32(8 + data.length, crc32(out.subarray(4, 8 + data.length)));
  return out;
};

/** A PNG file from its IHDR fields, extra chunks before IDAT, and the zlib stream of its IDAT. */
const pngFile = (
  width: number,
  height: number,
  depth: number,
  colour: number,
  zlib: Uint8Array,
  before: Uint8Array[] = [],
): Uint8Array => {
  const ihdr = new Uint8Array(13);
  const view = new DataView(ihdr.buffer);
  view.setUint32(0, width);
  view.setUint32(4, height);
  ihdr.set([depth, colour, 0, 0, 0], 8);
  const parts = [
    Uint8Array.of(0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a),
    chunk("IHDR", ihdr),
    ...before,
    chunk("IDAT", zlib),
    chunk("IEND", new Uint8Array(0)),
  ];
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) (out.set(p, at), at += p.length);
  return out;
};

/** Rows of `samples` (width · channels bytes each) with filter type 0 in front of each. */
const unfilteredRows = (samples: Uint8Array, width: number, height: number, channels: number): Uint8Array => {
  const rowBytes = width * channels;
  const out = new Uint8Array(height * (rowBytes + 1));
  for (let y = 0; y < height; y++) {
    out.set(samples.subarray(y * rowBytes, (y + 1) * rowBytes), y * (rowBytes + 1) + 1);
  }
  return out;
};

const randomBytes = (n: number, seed: number): Uint8Array => {
  const rng = rngFor(seed);
  return Uint8Array.from({ length: n }, () => Math.floor(rng.next() * 256));
};

/** 16 MiB of zeros after the declared image's scanlines: deflates to about 16 KB. */
const BOMB_BYTES = 16 * 2 ** 20;

Deno.test("a PNG whose data inflates far past its 8x8 header stops at the header's size and decodes the 8x8 image", async () => {
  const [width, height] = [8, 8];
  const pixels = randomBytes(width * height * 3, 1);
  const scanlines = unfilteredRows(pixels, width, height, 3);
  const stream = new Uint8Array(scanlines.length + BOMB_BYTES);
  stream.set(scanlines);
  const bomb = pngFile(width, height, 8, 2, zlibSync(stream, { level: 9 }));
  assert.ok(bomb.length < 64 * 1024, `the bomb is small: ${bomb.length} bytes`);

  const bounded = boundPng(bomb);
  assert.ok(typeof bounded !== "string", String(bounded));
  assert.equal(bounded.expected, 200, "8 rows of 1 filter byte + 24 sample bytes");
  // One 1 KB slice of deflate expands to at most ~1 MB: the inflater stops long before 16 MiB.
  assert.ok(
    bounded.inflated <= 200 + 1032 * 1024,
    `inflated ${bounded.inflated} bytes of a ${BOMB_BYTES}-byte stream`,
  );
  assert.deepEqual(bounded.scanlines, scanlines);

  const image = await decodeImagePromise(bomb);
  assert.deepEqual([image.width, image.height], [width, height]);
  assert.deepEqual(image.data, pixels);
});

Deno.test("a palette PNG bomb (the fast-png path) stops at the header's size too", async () => {
  const [width, height] = [8, 8];
  const rng = rngFor(2);
  const palette = randomBytes(16 * 3, 3);
  const indices = Uint8Array.from({ length: width * height }, () => Math.floor(rng.next() * 16));
  const scanlines = unfilteredRows(indices, width, height, 1);
  const stream = new Uint8Array(scanlines.length + BOMB_BYTES);
  stream.set(scanlines);
  const bomb = pngFile(width, height, 8, 3, zlibSync(stream, { level: 9 }), [chunk("PLTE", palette)]);
  const bounded = boundPng(bomb);
  assert.ok(typeof bounded !== "string", String(bounded));
  assert.ok(bounded.inflated <= 72 + 1032 * 1024, `inflated ${bounded.inflated} bytes`);
  const image = await decodeImagePromise(bomb);
  const want = Uint8Array.from(
    { length: width * height * 3 },
    (_, i) => palette[indices[Math.floor(i / 3)]! * 3 + (i % 3)]!,
  );
  assert.deepEqual(image.data, want);
});

Deno.test("pngScanlineBytes: plain and Adam7 sizes", () => {
  assert.equal(pngScanlineBytes(8, 8, 24, false), 8 * 25);
  assert.equal(pngScanlineBytes(5, 3, 1, false), 3 * 2);
  // Adam7 on 8x8 at 8 bits: passes of 1x1, 1x1, 2x1, 2x2, 4x2, 4x4, 8x4 pixels.
  const passes = [[1, 1], [1, 1], [2, 1], [2, 2], [4, 2], [4, 4], [8, 4]];
  assert.equal(pngScanlineBytes(8, 8, 8, true), passes.reduce((n, [w, h]) => n + h! * (1 + w!), 0));
  // A 1x1 image has only the first pass.
  assert.equal(pngScanlineBytes(1, 1, 32, true), 5);
});

/** PNG's filter f applied to one row (the encoder's side: predictors from the original samples). */
const filterRow = (f: number, row: Uint8Array, prev: Uint8Array, bpp: number): Uint8Array =>
  row.map((x, i) => {
    const a = i >= bpp ? row[i - bpp]! : 0;
    const b = prev[i]!;
    const c = i >= bpp ? prev[i - bpp]! : 0;
    const p = a + b - c;
    const paeth = Math.abs(p - a) <= Math.abs(p - b) && Math.abs(p - a) <= Math.abs(p - c)
      ? a
      : Math.abs(p - b) <= Math.abs(p - c)
      ? b
      : c;
    const predictor = [0, a, b, Math.floor((a + b) / 2), paeth][f]!;
    return (x - predictor) & 0xff;
  });

Deno.test("8-bit grey, grey + alpha, RGB and RGBA PNGs with every filter type decode to their samples", async () => {
  for (const [colour, channels] of [[0, 1], [4, 2], [2, 3], [6, 4]] as const) {
    const [width, height] = [61, 47];
    const samples = randomBytes(width * height * channels, 10 + colour);
    const rowBytes = width * channels;
    const scanlines = new Uint8Array(height * (rowBytes + 1));
    let prev: Uint8Array = new Uint8Array(rowBytes);
    for (let y = 0; y < height; y++) {
      const row = samples.subarray(y * rowBytes, (y + 1) * rowBytes);
      const f = y % 5; // every filter type, each on several rows
      scanlines[y * (rowBytes + 1)] = f;
      scanlines.set(filterRow(f, row, prev, channels), y * (rowBytes + 1) + 1);
      prev = row;
    }
    const image = await decodeImagePromise(pngFile(width, height, 8, colour, zlibSync(scanlines)));
    const want = new Uint8Array(width * height * 3);
    for (let p = 0; p < width * height; p++) {
      for (let c = 0; c < 3; c++) want[p * 3 + c] = samples[p * channels + (channels >= 3 ? c : 0)]!;
    }
    assert.deepEqual(image.data, want, `colour type ${colour}`);
  }
});

Deno.test("PNG data that ends before the declared image is a one-line error", async () => {
  const scanlines = unfilteredRows(randomBytes(8 * 8 * 3, 5), 8, 8, 3);
  const short = pngFile(8, 8, 8, 2, zlibSync(scanlines.subarray(0, 150)));
  await assert.rejects(
    decodeImagePromise(short),
    /truncated PNG \(its image data ends after 150 of 200 bytes\)/,
  );
  const badFilter = scanlines.slice();
  badFilter[25] = 7;
  await assert.rejects(
    decodeImagePromise(pngFile(8, 8, 8, 2, zlibSync(badFilter))),
    /unknown filter type 7 in row 1/,
  );
});
