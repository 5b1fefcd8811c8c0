/**
 * Memory and time of decoding a PNG bomb: an 8x8 RGB PNG (about 256 KB) whose
 * IDAT inflates to 256 MiB. Run once per codec module, each in its own process:
 *
 *   deno run -A bench/png_bomb_rss.ts ../data/image_codec.ts
 */
import { zlibSync } from "fflate";
const [module] = Deno.args;
const { decodeImagePromise } = await import(module!);
// 8x8 RGB PNG whose IDAT inflates to 256 MiB: the 200 scanline bytes, then zeros.
const zlib = (() => {
  const stream = new Uint8Array(200 + 256 * 2 ** 20);
  for (let y = 0; y < 8; y++) stream.fill(100 + y, y * 25 + 1, y * 25 + 25);
  return zlibSync(stream, { level: 9 });
})();
const crcT = Uint32Array.from({ length: 256 }, (_, n) => {
  let c = n;
  for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  return c >>> 0;
});
const crc = (b: Uint8Array) => {
  let c = 0xffffffff;
  for (const x of b) c = crcT[(c ^ x) & 0xff]! ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
};
const chunk = (type: string, data: Uint8Array) => {
  const o = new Uint8Array(12 + data.length);
  const v = new DataView(o.buffer);
  v.setUint32(0, data.length);
  o.set(new TextEncoder().encode(type), 4);
  o.set(data, 8);
  v.setUint32(8 + data.length, crc(o.subarray(4, 8 + data.length)));
  return o;
};
const ihdr = new Uint8Array(13);
new DataView(ihdr.buffer).setUint32(0, 8);
new DataView(ihdr.buffer).setUint32(4, 8);
ihdr.set([8, 2, 0, 0, 0], 8);
const parts = [
  Uint8Array.of(0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a),
  chunk("IHDR", ihdr),
  chunk("IDAT", zlib),
  chunk("IEND", new Uint8Array(0)),
];
const png = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
let at = 0;
for (const p of parts) {
  png.set(p, at);
  at += p.length;
}
(globalThis as { gc?: () => void }).gc?.();
const before = Deno.memoryUsage().rss;
let peak = before;
const timer = setInterval(() => {
  peak = Math.max(peak, Deno.memoryUsage().rss);
}, 1);
const t = performance.now();
const image = await decodeImagePromise(png);
peak = Math.max(peak, Deno.memoryUsage().rss);
clearInterval(timer);
console.log(
  `${module}: ${png.length}-byte PNG, ${image.width}x${image.height} decoded in ${
    (performance.now() - t).toFixed(0)
  } ms; RSS before ${(before / 2 ** 20).toFixed(0)} MiB, after ${
    (Deno.memoryUsage().rss / 2 ** 20).toFixed(0)
  } MiB`,
);
