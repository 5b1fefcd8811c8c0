/**
 * A PNG's image data inflated no further than its header allows.
 *
 * IHDR fixes the size of the filtered scanlines exactly (one filter byte and
 * ceil(width · bits per pixel / 8) bytes a row, per Adam7 pass when
 * interlaced), but the IDAT stream may inflate to anything: 2 MB of deflate
 * can expand to 2 GiB. fast-png inflates the whole stream before looking at
 * it, so the codec first walks the chunks itself (checking every CRC),
 * inflates IDAT in small input slices and stops once the scanlines are
 * complete. 8-bit grey and RGB(A) scanlines are then unfiltered here
 * (`unfilterRgb8`); palettes, other depths and Adam7 go to fast-png as an
 * equivalent PNG whose IDAT holds exactly those scanlines, stored.
 *
 * The declared image is decoded and anything after it ignored, as PIL does
 * (its zlib decoder stops when the image is full): the same file trains the
 * same in the reference, and one malformed-but-readable picture costs no more
 * memory than its declared size.
 */
import { Unzlib } from "fflate";

/** Samples per pixel of each PNG colour type (grey, RGB, palette, grey + alpha, RGBA). */
const CHANNELS: Readonly<Record<number, number>> = { 0: 1, 2: 3, 3: 1, 4: 2, 6: 4 };

/** Adam7 passes: x start, y start, x step, y step. */
const ADAM7: readonly (readonly [number, number, number, number])[] = [
  [0, 0, 8, 8],
  [4, 0, 8, 8],
  [0, 4, 4, 8],
  [2, 0, 4, 4],
  [0, 2, 2, 4],
  [1, 0, 2, 2],
  [0, 1, 1, 2],
];

/** Bytes of filtered scanlines an image of this header holds (the inflated IDAT's exact size). */
export const pngScanlineBytes = (
  width: number,
  height: number,
  bitsPerPixel: number,
  interlaced: boolean,
): number => {
  const rows = (
    w: number,
    h: number,
  ) => (w === 0 || h === 0 ? 0 : h * (1 + Math.ceil((w * bitsPerPixel) / 8)));
  if (!interlaced) return rows(width, height);
  let total = 0;
  for (const [x0, y0, dx, dy] of ADAM7) {
    total += rows(Math.ceil(Math.max(0, width - x0) / dx), Math.ceil(Math.max(0, height - y0) / dy));
  }
  return total;
};

let crcTable: Uint32Array | undefined;
/** CRC-32 (ISO 3309, as PNG chunks use) of bytes[start, end). */
const crc32 = (bytes: Uint8Array, start: number, end: number): number => {
  if (crcTable === undefined) {
    crcTable = new Uint32Array(256);
    for (let n = 0; n < 256; n++) {
      let c = n;
      for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
      crcTable[n] = c >>> 0;
    }
  }
  let c = 0xffffffff;
  for (let i = start; i < end; i++) c = crcTable[(c ^ bytes[i]!) & 0xff]! ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
};

/**
 * Compressed bytes pushed to the inflater at a time, for an image of
 * `expected` scanline bytes: deflate expands at most ~1032x, so one push past
 * the limit overshoots by at most ~1032 · max(1 KB, expected), capped at
 * ~17 MB (16 KB slices). Smaller slices cost time (fflate allocates ~160 KB a
 * push): 8 KB slices made 500x375 decodes ~1.3x slower.
 */
const inflateSlice = (expected: number): number => Math.max(1024, Math.min(16384, expected));

/** The fields of IHDR the decoder needs. */
export interface PngHeader {
  readonly width: number;
  readonly height: number;
  readonly depth: number;
  /** PNG colour type: 0 grey, 2 RGB, 3 palette, 4 grey + alpha, 6 RGBA. */
  readonly colour: number;
  readonly interlaced: boolean;
  readonly channels: number;
}

/** A PNG's chunks checked and its image data inflated no further than its header allows. */
export interface BoundedPng {
  readonly header: PngHeader;
  /** The filtered scanlines: at most `expected` bytes (fewer when the stream ends early). */
  readonly scanlines: Uint8Array;
  /** Bytes the inflater produced (at most `expected` plus one slice's expansion). */
  readonly inflated: number;
  /** The scanlines' size the header declares. */
  readonly expected: number;
  /** An equivalent PNG for fast-png: IHDR, PLTE and tRNS as read, one IDAT of the stored scanlines, IEND. */
  readonly rebuild: () => Uint8Array;
}

/**
 * A chunk of the bounded PNG. Its CRC is left 0: the original chunks' CRCs are
 * checked above and fast-png reads this PNG with `checkCrc: false`, so a CRC
 * over the (uncompressed, larger) scanlines would cost time and check nothing.
 */
const chunk = (type: string, data: Uint8Array): Uint8Array => {
  const out = new Uint8Array(12 + data.length);
  new DataView(out.buffer).setUint32(0, data.length);
  for (let i = 0; i < 4; i++) out[4 + i] = type.charCodeAt(i);
  out.set(data, 8);
  return out;
};

/** A zlib stream of stored (uncompressed) deflate blocks holding `data`. */
const storedZlib = (data: Uint8Array): Uint8Array => {
  const blocks = Math.max(1, Math.ceil(data.length / 65535));
  const out = new Uint8Array(2 + blocks * 5 + data.length + 4);
  out[0] = 0x78;
  out[1] = 0x01;
  let at = 2;
  for (let b = 0; b < blocks; b++) {
    const part = data.subarray(b * 65535, Math.min(data.length, (b + 1) * 65535));
    out[at] = b === blocks - 1 ? 1 : 0;
    out[at + 1] = part.length & 0xff;
    out[at + 2] = part.length >>> 8;
    out[at + 3] = ~part.length & 0xff;
    out[at + 4] = (~part.length >>> 8) & 0xff;
    out.set(part, at + 5);
    at += 5 + part.length;
  }
  let [a, s] = [1, 0];
  // zlib's runs of 5552 bytes between reductions (its NMAX; doubles would allow longer ones).
  for (let i = 0; i < data.length; i += 5552) {
    const end = Math.min(data.length, i + 5552);
    for (let j = i; j < end; j++) {
      a += data[j]!;
      s += a;
    }
    a %= 65521;
    s %= 65521;
  }
  new DataView(out.buffer).setUint32(at, ((s << 16) | a) >>> 0);
  return out;
};

/**
 * Walks the chunks of a PNG (signature already checked), verifies every CRC,
 * and inflates its IDAT no further than IHDR allows; the bounded PNG, or why
 * the file is not a readable PNG.
 */
export const boundPng = (bytes: Uint8Array): BoundedPng | string => {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const kept: Uint8Array[] = [];
  const data: [number, number][] = [];
  let ihdr: Uint8Array | undefined;
  let ended = false;
  for (let at = 8; !ended;) {
    if (at + 8 > bytes.length) return "truncated PNG (the file ends before its IEND chunk)";
    const length = view.getUint32(at);
    const type = String.fromCharCode(bytes[at + 4]!, bytes[at + 5]!, bytes[at + 6]!, bytes[at + 7]!);
    const end = at + 12 + length;
    if (end > bytes.length) return `truncated PNG (the ${type} chunk runs past the end of the file)`;
    if (crc32(bytes, at + 4, at + 8 + length) !== view.getUint32(at + 8 + length)) {
      return `corrupt PNG (CRC mismatch in the ${type} chunk at byte ${at})`;
    }
    if (type === "IHDR") ihdr = bytes.subarray(at, end);
    else if ((type === "PLTE" || type === "tRNS") && data.length === 0) kept.push(bytes.subarray(at, end));
    else if (type === "IDAT") data.push([at + 8, at + 8 + length]);
    else if (type === "IEND") ended = true;
    at = end;
  }
  if (ihdr === undefined || ihdr.length !== 25) return "corrupt PNG (no 13-byte IHDR chunk)";
  if (data.length === 0) return "corrupt PNG (no IDAT chunk: no image data)";
  const fields = new DataView(ihdr.buffer, ihdr.byteOffset, ihdr.byteLength);
  const [width, height, depth, colour, interlace] = [
    fields.getUint32(8),
    fields.getUint32(12),
    ihdr[16]!,
    ihdr[17]!,
    ihdr[20]!,
  ];
  const channels = CHANNELS[colour];
  if (channels === undefined) return `corrupt PNG (unknown colour type ${colour})`;
  if (interlace > 1) return `corrupt PNG (unknown interlace method ${interlace})`;
  const expected = pngScanlineBytes(width, height, channels * depth, interlace === 1);

  const parts: Uint8Array[] = [];
  const slice = inflateSlice(expected);
  let inflated = 0;
  const inflater = new Unzlib((part) => {
    parts.push(part);
    inflated += part.length;
  });
  try {
    for (const [start, end] of data) {
      for (let at = start; at < end && inflated < expected; at += slice) {
        inflater.push(bytes.subarray(at, Math.min(end, at + slice)), false);
      }
    }
    // The inflater may hold back the stream's last bits until told it ended.
    if (inflated < expected) inflater.push(new Uint8Array(0), true);
  } catch (cause) {
    return `corrupt or truncated PNG (error while decompressing the data: ${
      cause instanceof Error ? cause.message : String(cause)
    })`;
  }
  const scanlines = new Uint8Array(Math.min(inflated, expected));
  let filled = 0;
  for (const part of parts) {
    if (filled >= scanlines.length) break;
    const take = part.subarray(0, scanlines.length - filled);
    scanlines.set(take, filled);
    filled += take.length;
  }
  const rebuild = (): Uint8Array => {
    const pieces = [
      bytes.subarray(0, 8),
      ihdr!,
      ...kept,
      chunk("IDAT", storedZlib(scanlines)),
      chunk("IEND", new Uint8Array(0)),
    ];
    const png = new Uint8Array(pieces.reduce((n, p) => n + p.length, 0));
    let at = 0;
    for (const piece of pieces) {
      png.set(piece, at);
      at += piece.length;
    }
    return png;
  };
  const header = { width, height, depth, colour, interlaced: interlace === 1, channels };
  return { header, scanlines, inflated, expected, rebuild };
};

/**
 * Unfilters non-interlaced 8-bit scanlines (PNG filter types 0-4) straight
 * into RGB as PIL's convert("RGB"): grey replicated, alpha dropped. The common
 * case, in one pass; other depths, palettes and Adam7 go through fast-png.
 */
export const unfilterRgb8 = (header: PngHeader, scanlines: Uint8Array): Uint8Array | string => {
  const { width, height, channels } = header;
  const rowBytes = width * channels;
  const bpp = channels; // bytes per pixel at 8 bits
  const out = new Uint8Array(width * height * 3);
  let prev = new Uint8Array(rowBytes);
  let row = new Uint8Array(rowBytes);
  for (let y = 0; y < height; y++) {
    const start = y * (rowBytes + 1);
    const filter = scanlines[start]!;
    const line = scanlines.subarray(start + 1, start + 1 + rowBytes);
    if (filter === 0) row.set(line);
    else if (filter === 1) {
      for (let x = 0; x < rowBytes; x++) row[x] = line[x]! + (x >= bpp ? row[x - bpp]! : 0);
    } else if (filter === 2) {
      for (let x = 0; x < rowBytes; x++) row[x] = line[x]! + prev[x]!;
    } else if (filter === 3) {
      for (let x = 0; x < rowBytes; x++) {
        row[x] = line[x]! + (((x >= bpp ? row[x - bpp]! : 0) + prev[x]!) >> 1);
      }
    } else if (filter === 4) {
      for (let x = 0; x < rowBytes; x++) {
        const a = x >= bpp ? row[x - bpp]! : 0;
        const b = prev[x]!;
        const c = x >= bpp ? prev[x - bpp]! : 0;
        const pa = Math.abs(b - c);
        const pb = Math.abs(a - c);
        const pc = Math.abs(a + b - 2 * c);
        row[x] = line[x]! + (pa <= pb && pa <= pc ? a : pb <= pc ? b : c);
      }
    } else return `corrupt PNG (unknown filter type ${filter} in row ${y})`;
    const base = y * width * 3;
    if (channels >= 3) {
      for (let x = 0; x < width; x++) {
        out[base + x * 3] = row[x * channels]!;
        out[base + x * 3 + 1] = row[x * channels + 1]!;
        out[base + x * 3 + 2] = row[x * channels + 2]!;
      }
    } else {
      for (let x = 0; x < width; x++) {
        const v = row[x * channels]!;
        out[base + x * 3] = v;
        out[base + x * 3 + 1] = v;
        out[base + x * 3 + 2] = v;
      }
    }
    [prev, row] = [row, prev];
  }
  return out;
};
