/**
 * The decode stage: encoded image bytes (PNG or JPEG) to an RGB image, HWC, uint8.
 *
 * - PNG is decoded here in TypeScript (zlib through the built-in
 *   `DecompressionStream`): every colour type and bit depth, Adam7, CRCs checked.
 *   Owning the decoder gives exact control of 16-bit samples (scaled by
 *   round(v / 257)), which imagescript truncates to the high byte.
 * - JPEG goes through libjpeg-turbo (`libturbojpeg.so.0`, Debian's
 *   `libturbojpeg0`) by `Deno.dlopen` where it is present and FFI is allowed
 *   (about 7x faster than imagescript, and the same library and settings as PIL:
 *   islow DCT, fancy upsampling), else through imagescript's wasm decoder.
 *
 * The format is detected from the leading bytes, never from the file name, so a
 * non-image with an image extension is a `DecodeError`, as is a truncated or
 * corrupt file. Pixel values match PIL's `convert("RGB")`: alpha is dropped,
 * grey is replicated, palettes are expanded.
 */
import { Effect, Option, Schema } from "effect";
import { Image } from "imagescript";
import { defineStage } from "./stage.ts";

/** An 8-bit RGB image, HWC, row-major: pixel (x, y) channel c is `data[(y * width + x) * 3 + c]`. */
export interface RgbImage {
  readonly width: number;
  readonly height: number;
  readonly data: Uint8Array;
}

/** A file that could not be read or decoded; `path` names it, `reason` says why. */
export class DecodeError extends Schema.TaggedError<DecodeError>()("DecodeError", {
  path: Schema.String,
  reason: Schema.String,
}) {
  override get message(): string {
    return `${this.path}: ${this.reason}`;
  }
}

/** Largest accepted image, in pixels: a guard against a corrupt header asking for gigabytes. */
const MAX_PIXELS = 1 << 28;

/** Which JPEG decoder to use; `auto` takes libjpeg-turbo when it loads. */
export type JpegDecoder = "auto" | "turbojpeg" | "imagescript";

export interface DecodeOptions {
  readonly jpeg?: JpegDecoder;
}

/** Decodes PNG or JPEG bytes to RGB; `path` only labels the error. */
export const decodeImage = (
  bytes: Uint8Array,
  path = "<bytes>",
  options: DecodeOptions = {},
): Effect.Effect<RgbImage, DecodeError> =>
  Effect.tryPromise({
    try: () => decodeImagePromise(bytes, options),
    catch: (cause) => new DecodeError({ path, reason: reasonOf(cause) }),
  });

/** Reads and decodes one image file; an unreadable file is a `DecodeError` naming it. */
export const readImage = (path: string, options: DecodeOptions = {}): Effect.Effect<RgbImage, DecodeError> =>
  Effect.tryPromise({
    try: () => Deno.readFile(path),
    catch: (cause) => new DecodeError({ path, reason: `cannot read file: ${reasonOf(cause)}` }),
  }).pipe(Effect.flatMap((bytes) => decodeImage(bytes, path, options)));

const reasonOf = (cause: unknown): string => cause instanceof Error ? cause.message : String(cause);

/** The promise form of `decodeImage` (used inside workers); throws `Error` with the reason. */
export const decodeImagePromise = async (
  bytes: Uint8Array,
  options: DecodeOptions = {},
): Promise<RgbImage> => {
  if (isPng(bytes)) return await decodePng(bytes);
  if (isJpeg(bytes)) return await decodeJpeg(bytes, options.jpeg ?? "auto");
  throw new Error(
    bytes.length === 0 ? "empty file" : "unrecognised image format (neither a PNG nor a JPEG signature)",
  );
};

const PNG_SIGNATURE = [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a];
const isPng = (b: Uint8Array) => b.length >= 8 && PNG_SIGNATURE.every((v, i) => b[i] === v);
const isJpeg = (b: Uint8Array) => b.length >= 3 && b[0] === 0xff && b[1] === 0xd8 && b[2] === 0xff;

// ---------------------------------------------------------------------------------------------
// PNG

const CRC_TABLE = (() => {
  const table = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    table[n] = c >>> 0;
  }
  return table;
})();

const crc32 = (bytes: Uint8Array, start: number, end: number): number => {
  let c = 0xffffffff;
  for (let i = start; i < end; i++) c = CRC_TABLE[(c ^ bytes[i]) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
};

/** round(v / 257) for every 16-bit sample; exact (v / 257 is never k + 0.5 for integer v). */
let scale16: Uint8Array | undefined;
const scale16Table = (): Uint8Array => {
  if (!scale16) {
    scale16 = new Uint8Array(65536);
    for (let v = 0; v < 65536; v++) scale16[v] = Math.round(v / 257);
  }
  return scale16;
};

const CHANNELS_OF_COLOUR_TYPE: Record<number, number> = { 0: 1, 2: 3, 3: 1, 4: 2, 6: 4 };
const ALLOWED_DEPTHS: Record<number, number[]> = {
  0: [1, 2, 4, 8, 16],
  2: [8, 16],
  3: [1, 2, 4, 8],
  4: [8, 16],
  6: [8, 16],
};
const ADAM7 = [
  [0, 0, 8, 8],
  [4, 0, 8, 8],
  [0, 4, 4, 8],
  [2, 0, 4, 4],
  [0, 2, 2, 4],
  [1, 0, 2, 2],
  [0, 1, 1, 2],
] as const;

const inflate = async (compressed: Uint8Array): Promise<Uint8Array> => {
  const stream = new Blob([compressed as Uint8Array<ArrayBuffer>]).stream().pipeThrough(
    new DecompressionStream("deflate"),
  );
  try {
    return new Uint8Array(await new Response(stream).arrayBuffer());
  } catch (cause) {
    throw new Error(`corrupt or truncated PNG image data (zlib: ${reasonOf(cause)})`);
  }
};

const decodePng = async (bytes: Uint8Array): Promise<RgbImage> => {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  let offset = 8;
  let header: { width: number; height: number; depth: number; colour: number; interlace: number } | undefined;
  let palette: Uint8Array | undefined;
  const idat: Uint8Array[] = [];
  let ended = false;
  while (offset < bytes.length) {
    if (offset + 12 > bytes.length) throw new Error("truncated PNG (incomplete chunk header)");
    const length = view.getUint32(offset);
    const type = String.fromCharCode(...bytes.subarray(offset + 4, offset + 8));
    const dataStart = offset + 8;
    const dataEnd = dataStart + length;
    if (dataEnd + 4 > bytes.length) {
      throw new Error(`truncated PNG (chunk ${type} runs past the end of the file)`);
    }
    if (crc32(bytes, offset + 4, dataEnd) !== view.getUint32(dataEnd)) {
      throw new Error(`corrupt PNG (CRC mismatch in chunk ${type})`);
    }
    const data = bytes.subarray(dataStart, dataEnd);
    if (type === "IHDR") {
      if (length !== 13) throw new Error("corrupt PNG (IHDR has the wrong length)");
      header = {
        width: view.getUint32(dataStart),
        height: view.getUint32(dataStart + 4),
        depth: data[8],
        colour: data[9],
        interlace: data[12],
      };
    } else if (type === "PLTE") palette = data;
    else if (type === "IDAT") idat.push(data);
    else if (type === "IEND") {
      ended = true;
      break;
    }
    offset = dataEnd + 4;
  }
  if (!header) throw new Error("corrupt PNG (no IHDR chunk)");
  const { width, height, depth, colour, interlace } = header;
  if (!(colour in ALLOWED_DEPTHS) || !ALLOWED_DEPTHS[colour].includes(depth)) {
    throw new Error(`unsupported PNG colour type ${colour} with bit depth ${depth}`);
  }
  if (width === 0 || height === 0 || width * height > MAX_PIXELS) {
    throw new Error(`PNG size ${width}x${height} out of range`);
  }
  if (interlace > 1) throw new Error(`unknown PNG interlace method ${interlace}`);
  if (colour === 3 && !palette) throw new Error("corrupt PNG (palette image without PLTE)");
  if (idat.length === 0) throw new Error("truncated PNG (no image data)");
  if (!ended) throw new Error("truncated PNG (no IEND chunk)");

  const compressed = idat.length === 1 ? idat[0] : concat(idat);
  const raw = await inflate(compressed);
  const channels = CHANNELS_OF_COLOUR_TYPE[colour];
  const bitsPerPixel = channels * depth;
  const filterStride = Math.max(1, bitsPerPixel >> 3);
  const out = new Uint8Array(width * height * 3);
  const emit = makePixelWriter(out, width, colour, depth, palette);

  let position = 0;
  const passes = interlace ? ADAM7 : [[0, 0, 1, 1] as const];
  for (const [x0, y0, dx, dy] of passes) {
    const passWidth = Math.ceil((width - x0) / dx);
    const passHeight = Math.ceil((height - y0) / dy);
    if (passWidth <= 0 || passHeight <= 0) continue;
    const rowBytes = Math.ceil((passWidth * bitsPerPixel) / 8);
    let previous = new Uint8Array(rowBytes);
    let current = new Uint8Array(rowBytes);
    for (let r = 0; r < passHeight; r++) {
      if (position + 1 + rowBytes > raw.length) throw new Error("truncated PNG (image data ends early)");
      const filter = raw[position];
      current.set(raw.subarray(position + 1, position + 1 + rowBytes));
      position += 1 + rowBytes;
      unfilter(filter, current, previous, filterStride);
      emit(current, y0 + r * dy, x0, dx, passWidth);
      [previous, current] = [current, previous];
    }
  }
  return { width, height, data: out };
};

const concat = (parts: Uint8Array[]): Uint8Array => {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const part of parts) {
    out.set(part, at);
    at += part.length;
  }
  return out;
};

const unfilter = (filter: number, row: Uint8Array, prev: Uint8Array, bpp: number): void => {
  const n = row.length;
  switch (filter) {
    case 0:
      return;
    case 1:
      for (let i = bpp; i < n; i++) row[i] = (row[i] + row[i - bpp]) & 0xff;
      return;
    case 2:
      for (let i = 0; i < n; i++) row[i] = (row[i] + prev[i]) & 0xff;
      return;
    case 3:
      for (let i = 0; i < n; i++) {
        const left = i >= bpp ? row[i - bpp] : 0;
        row[i] = (row[i] + ((left + prev[i]) >> 1)) & 0xff;
      }
      return;
    case 4:
      for (let i = 0; i < n; i++) {
        const a = i >= bpp ? row[i - bpp] : 0;
        const b = prev[i];
        const c = i >= bpp ? prev[i - bpp] : 0;
        const pa = Math.abs(b - c);
        const pb = Math.abs(a - c);
        const pc = Math.abs(a + b - 2 * c);
        const predictor = pa <= pb && pa <= pc ? a : pb <= pc ? b : c;
        row[i] = (row[i] + predictor) & 0xff;
      }
      return;
    default:
      throw new Error(`corrupt PNG (unknown row filter ${filter})`);
  }
};

/** Writes one unfiltered row of `count` pixels to RGB output at (x0 + k * dx, y). */
const makePixelWriter = (
  out: Uint8Array,
  width: number,
  colour: number,
  depth: number,
  palette: Uint8Array | undefined,
) => {
  const lut16 = depth === 16 ? scale16Table() : undefined;
  const channels = CHANNELS_OF_COLOUR_TYPE[colour];
  return (row: Uint8Array, y: number, x0: number, dx: number, count: number): void => {
    let o = (y * width + x0) * 3;
    const step = dx * 3;
    if (depth < 8) {
      // Grey or palette indices packed MSB first.
      const perByte = 8 / depth;
      const mask = (1 << depth) - 1;
      const greyScale = 255 / mask;
      for (let k = 0; k < count; k++, o += step) {
        const value = (row[(k / perByte) | 0] >> ((perByte - 1 - (k % perByte)) * depth)) & mask;
        if (colour === 3) writePalette(out, o, palette!, value);
        else out[o] = out[o + 1] = out[o + 2] = value * greyScale;
      }
      return;
    }
    const sample = lut16 ? (i: number) => lut16[(row[2 * i] << 8) | row[2 * i + 1]] : (i: number) => row[i];
    for (let k = 0; k < count; k++, o += step) {
      const base = k * channels;
      if (colour === 3) writePalette(out, o, palette!, row[k]);
      else if (colour === 0 || colour === 4) out[o] = out[o + 1] = out[o + 2] = sample(base);
      else {
        out[o] = sample(base);
        out[o + 1] = sample(base + 1);
        out[o + 2] = sample(base + 2);
      }
    }
  };
};

const writePalette = (out: Uint8Array, o: number, palette: Uint8Array, index: number) => {
  // An index past the palette is a spec violation that decoders (PIL included) render as black.
  if (index * 3 + 2 < palette.length) {
    out[o] = palette[index * 3];
    out[o + 1] = palette[index * 3 + 1];
    out[o + 2] = palette[index * 3 + 2];
  } else out[o] = out[o + 1] = out[o + 2] = 0;
};

// ---------------------------------------------------------------------------------------------
// JPEG

const decodeJpeg = async (bytes: Uint8Array, decoder: JpegDecoder): Promise<RgbImage> => {
  if (decoder !== "imagescript") {
    const turbo = turboJpeg();
    if (turbo) {
      const result = turbo.decode(bytes);
      if (result !== "unsupported") return result;
    } else if (decoder === "turbojpeg") {
      throw new Error(`libjpeg-turbo is not available: ${turboLoadError}`);
    }
  }
  return await decodeJpegImagescript(bytes);
};

const decodeJpegImagescript = async (bytes: Uint8Array): Promise<RgbImage> => {
  // imagescript's wasm decoder accepts some truncated streams (padding the rest grey);
  // a JPEG must end with the EOI marker, which PIL also insists on for a complete load.
  if (!hasEndMarker(bytes)) throw new Error("truncated JPEG (no end-of-image marker)");
  let image: Image;
  try {
    image = await Image.decode(bytes) as Image;
  } catch (cause) {
    throw new Error(`corrupt JPEG: ${reasonOf(cause)}`);
  }
  const { width, height, bitmap } = image;
  const out = new Uint8Array(width * height * 3);
  for (let i = 0, j = 0; j < out.length; i += 4, j += 3) {
    out[j] = bitmap[i];
    out[j + 1] = bitmap[i + 1];
    out[j + 2] = bitmap[i + 2];
  }
  return { width, height, data: out };
};

/** True when the last marker-looking bytes (ignoring trailing padding) are EOI (FF D9). */
const hasEndMarker = (bytes: Uint8Array): boolean => {
  let end = bytes.length;
  // Some writers pad after EOI with zeros or newlines; tolerate a little.
  while (end > 2 && bytes.length - end < 64 && (bytes[end - 1] === 0 || bytes[end - 1] === 0x0a)) end--;
  return end >= 4 && bytes[end - 2] === 0xff && bytes[end - 1] === 0xd9;
};

interface TurboJpeg {
  decode(bytes: Uint8Array): RgbImage | "unsupported";
}

let turbo: TurboJpeg | null | undefined;
let turboLoadError = "not tried";

/** Loads libjpeg-turbo once per thread (each Worker has its own handle); null if unavailable. */
const turboJpeg = (): TurboJpeg | null => {
  if (turbo !== undefined) return turbo;
  try {
    turbo = openTurboJpeg();
  } catch (cause) {
    turboLoadError = reasonOf(cause);
    turbo = null;
  }
  return turbo;
};

const TJPF_RGB = 0;
const TJCS_CMYK = 3;
const TJCS_YCCK = 4;
const TJERR_FATAL = 1;

const openTurboJpeg = (): TurboJpeg => {
  const lib = Deno.dlopen("libturbojpeg.so.0", {
    tjInitDecompress: { parameters: [], result: "pointer" },
    tjDecompressHeader3: {
      parameters: ["pointer", "buffer", "u64", "buffer", "buffer", "buffer", "buffer"],
      result: "i32",
    },
    tjDecompress2: {
      parameters: ["pointer", "buffer", "u64", "buffer", "i32", "i32", "i32", "i32", "i32"],
      result: "i32",
    },
    tjGetErrorStr2: { parameters: ["pointer"], result: "pointer" },
    tjGetErrorCode: { parameters: ["pointer"], result: "i32" },
  });
  const handle = lib.symbols.tjInitDecompress();
  if (handle === null) throw new Error("tjInitDecompress failed");
  const widthOut = new Int32Array(1);
  const heightOut = new Int32Array(1);
  const subsampOut = new Int32Array(1);
  const colourspaceOut = new Int32Array(1);
  const message = () => {
    const pointer = lib.symbols.tjGetErrorStr2(handle);
    return pointer === null
      ? "unknown libjpeg-turbo error"
      : new Deno.UnsafePointerView(pointer).getCString();
  };
  return {
    decode(bytes) {
      if (
        lib.symbols.tjDecompressHeader3(
          handle,
          bytes,
          BigInt(bytes.length),
          widthOut,
          heightOut,
          subsampOut,
          colourspaceOut,
        ) !== 0
      ) throw new Error(`corrupt JPEG header: ${message()}`);
      const width = widthOut[0];
      const height = heightOut[0];
      if (width <= 0 || height <= 0 || width * height > MAX_PIXELS) {
        throw new Error(`JPEG size ${width}x${height} out of range`);
      }
      // TurboJPEG cannot convert CMYK/YCCK to RGB; imagescript can.
      if (colourspaceOut[0] === TJCS_CMYK || colourspaceOut[0] === TJCS_YCCK) return "unsupported";
      const out = new Uint8Array(width * height * 3);
      const status = lib.symbols.tjDecompress2(
        handle,
        bytes,
        BigInt(bytes.length),
        out,
        width,
        0,
        height,
        TJPF_RGB,
        0, // islow DCT, fancy upsampling: PIL's defaults
      );
      if (status !== 0) {
        const text = message();
        // Warnings leave a complete image, except "Premature end of JPEG file": the
        // missing rows are filled grey, and a truncated file must not pass silently.
        if (lib.symbols.tjGetErrorCode(handle) === TJERR_FATAL) throw new Error(`corrupt JPEG: ${text}`);
        if (/premature end/i.test(text)) throw new Error(`truncated JPEG: ${text}`);
      }
      return { width, height, data: out };
    },
  };
};

/** Which JPEG decoder `auto` uses on this thread (for reports and benchmarks). */
export const jpegBackend = (): "turbojpeg" | "imagescript" => turboJpeg() ? "turbojpeg" : "imagescript";

// ---------------------------------------------------------------------------------------------
// Stage

/** What to do with an input that cannot be decoded: drop it (counted by the loader) or stop the run. */
export const DecodeErrorPolicy = Schema.Literals(["skip", "fail"]);
export type DecodeErrorPolicy = typeof DecodeErrorPolicy.Type;

export const DecodeConfig = Schema.Struct({
  onError: DecodeErrorPolicy.pipe(Schema.withDecodingDefaultKey(Effect.succeed("skip" as const))),
  jpeg: Schema.Literals(["auto", "turbojpeg", "imagescript"]).pipe(
    Schema.withDecodingDefaultKey(Effect.succeed("auto" as const)),
  ),
});
export type DecodeConfig = typeof DecodeConfig.Type;

/** One encoded image: its bytes and the path that names it in errors. */
export interface EncodedImage {
  readonly path: string;
  readonly bytes: Uint8Array;
}

/**
 * The decode stage. With `onError: "skip"` a bad input gives `Option.none()` and a
 * warning in the log (the loader counts and reports skips); with `"fail"` it fails
 * with the `DecodeError`.
 */
export const decodeStage = defineStage({
  name: "decode",
  config: DecodeConfig,
  run: (config: DecodeConfig) => (input: EncodedImage): Effect.Effect<Option.Option<RgbImage>, DecodeError> =>
    decodeImage(input.bytes, input.path, { jpeg: config.jpeg }).pipe(
      Effect.map(Option.some),
      Effect.catchTag(
        "DecodeError",
        (error) =>
          config.onError === "fail"
            ? Effect.fail(error)
            : Effect.logWarning(`skipped ${error.path}: ${error.reason}`).pipe(Effect.as(Option.none())),
      ),
    ),
});
