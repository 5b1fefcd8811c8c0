/**
 * The image codec: encoded image bytes (PNG or JPEG) to an RGB image, HWC, uint8.
 *
 * - PNG is parsed by fast-png (every colour type and bit depth, Adam7), after
 *   data/png_bounded.ts has checked the CRCs and inflated the image data no
 *   further than the header's size (a decompression bomb stops there); fast-png
 *   keeps 16-bit samples whole; imagescript truncates them to
 *   the high byte, where PIL scales them by round(v / 257), as done here.
 * - JPEG goes through libjpeg-turbo (`backend/turbojpeg.ts`) where it is present
 *   and FFI is allowed (about 7x faster than imagescript, and the same library
 *   and settings as PIL: islow DCT, fancy upsampling), else through imagescript's
 *   wasm decoder.
 *
 * The format is detected from the leading bytes, never from the file name, so a
 * non-image with an image extension is a `DecodeError`, as is a truncated or
 * corrupt file. Pixel values match PIL's `convert("RGB")`: alpha is dropped,
 * grey is replicated, palettes are expanded.
 */
import { Effect, Schema } from "effect";
import { decode as parsePng } from "fast-png";
import { Image } from "imagescript";
import { turboJpeg, turboJpegLoadError } from "../backend/turbojpeg.ts";
import { reasonOf } from "./errors.ts";
import { MAX_IMAGE_FILE_BYTES, readRegularFile } from "./files.ts";
import { boundPng, unfilterRgb8 } from "./png_bounded.ts";

/** An 8-bit RGB image, HWC, row-major: pixel (x, y) channel c is `data[(y * width + x) * 3 + c]`. */
export interface RgbImage {
  /** Width in pixels. */
  readonly width: number;
  /** Height in pixels. */
  readonly height: number;
  /** `width * height * 3` bytes, RGB interleaved. */
  readonly data: Uint8Array;
}

/** A file that could not be read or decoded; `path` names it, `reason` says why. */
export class DecodeError extends Schema.TaggedError<DecodeError>()("DecodeError", {
  path: Schema.String,
  reason: Schema.String,
}) {
  /** The file and the reason, on one line. */
  override get message(): string {
    return `${this.path}: ${this.reason}`;
  }
}

/**
 * Largest accepted image, in pixels, by default: PIL's `Image.MAX_IMAGE_PIXELS`
 * (89,478,485, about 256 MB of RGB). A header declaring more is rejected before
 * anything is inflated or allocated (a decompression bomb: a few hundred KB of
 * PNG or JPEG can declare gigabytes). `SWAV_MAX_IMAGE_PIXELS` or
 * `DecodeOptions.maxPixels` changes it.
 */
export const DEFAULT_MAX_IMAGE_PIXELS = 89_478_485;

/** The pixel cap in force: `SWAV_MAX_IMAGE_PIXELS` when it is a positive integer, else the default. */
export const maxImagePixels = (): number => {
  let text: string | undefined;
  try {
    text = Deno.env.get("SWAV_MAX_IMAGE_PIXELS");
  } catch {
    text = undefined; // no --allow-env: the default
  }
  const value = Number(text);
  return text !== undefined && Number.isSafeInteger(value) && value > 0 ? value : DEFAULT_MAX_IMAGE_PIXELS;
};

/** Which JPEG decoder to use; `auto` takes libjpeg-turbo when it loads. */
export type JpegDecoder = "auto" | "turbojpeg" | "imagescript";

export interface DecodeOptions {
  readonly jpeg?: JpegDecoder;
  /** Largest accepted width x height (default `maxImagePixels()`). */
  readonly maxPixels?: number;
}

/** The codec's outcome as a value: the image, or why the bytes are not one. */
export type DecodeResult = { readonly image: RgbImage } | { readonly reason: string };

/** A failed decode: the reason, as a string. */
type Failed = string;

/**
 * Decodes PNG or JPEG bytes to RGB without throwing: a bad input gives
 * `{ reason }` (used by workers, which post the reason back).
 */
export const decodeImageResult = async (
  bytes: Uint8Array,
  options: DecodeOptions = {},
): Promise<DecodeResult> => {
  const out = await decodeAny(bytes, options).catch(reasonOf);
  return typeof out === "string" ? { reason: out } : { image: out };
};

/** Decodes PNG or JPEG bytes to RGB; `path` only labels the error. */
export const decodeImage = (
  bytes: Uint8Array,
  path = "<bytes>",
  options: DecodeOptions = {},
): Effect.Effect<RgbImage, DecodeError> =>
  Effect.tryPromise({
    try: () => decodeAny(bytes, options),
    catch: (cause) => new DecodeError({ path, reason: reasonOf(cause) }),
  }).pipe(
    Effect.flatMap((out) =>
      typeof out === "string" ? Effect.fail(new DecodeError({ path, reason: out })) : Effect.succeed(out)
    ),
  );

/**
 * The bytes of one image file: a regular file (symlinks followed) of at most
 * `MAX_IMAGE_FILE_BYTES`; a directory, FIFO, device or symlink loop is a
 * `DecodeError` naming it, and is never opened for reading.
 */
export const readImageFile = (path: string): Effect.Effect<Uint8Array, DecodeError> =>
  Effect.tryPromise({
    try: () => readRegularFile(path, MAX_IMAGE_FILE_BYTES),
    catch: (cause) => new DecodeError({ path, reason: `cannot read file: ${reasonOf(cause)}` }),
  }).pipe(Effect.flatMap((out) =>
    typeof out === "string"
      ? Effect.fail(new DecodeError({ path, reason: `cannot read file: ${out}` }))
      : Effect.succeed(out)
  ));

/** Reads and decodes one image file; an unreadable file is a `DecodeError` naming it. */
export const readImage = (path: string, options: DecodeOptions = {}): Effect.Effect<RgbImage, DecodeError> =>
  Effect.flatMap(readImageFile(path), (bytes) => decodeImage(bytes, path, options));

/**
 * The promise form of `decodeImage`, for plain-TypeScript callers (benchmarks):
 * rejects with the `DecodeError`.
 */
export const decodeImagePromise = async (
  bytes: Uint8Array,
  options: DecodeOptions = {},
): Promise<RgbImage> => {
  const out = await decodeAny(bytes, options);
  return typeof out === "string" ? Promise.reject(new DecodeError({ path: "<bytes>", reason: out })) : out;
};

const decodeAny = async (bytes: Uint8Array, options: DecodeOptions): Promise<RgbImage | Failed> => {
  const maxPixels = options.maxPixels ?? maxImagePixels();
  if (isPng(bytes)) return decodePng(bytes, maxPixels);
  if (isJpeg(bytes)) return await decodeJpeg(bytes, options.jpeg ?? "auto", maxPixels);
  return bytes.length === 0 ? "empty file" : "unrecognised image format (neither a PNG nor a JPEG signature)";
};

const PNG_SIGNATURE = [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a];
const isPng = (b: Uint8Array) => b.length >= 8 && PNG_SIGNATURE.every((v, i) => b[i] === v);
const isJpeg = (b: Uint8Array) => b.length >= 3 && b[0] === 0xff && b[1] === 0xd8 && b[2] === 0xff;

// ---------------------------------------------------------------------------------------------
// PNG: fast-png parses (every colour type and depth, Adam7, CRCs checked); here only the conversion
// to 8-bit RGB as PIL's convert("RGB") does it.

/** round(v / 257) for every 16-bit sample; exact (v / 257 is never k + 0.5 for integer v). */
let scale16: Uint8Array | undefined;
const scale16Table = (): Uint8Array => {
  if (!scale16) {
    scale16 = new Uint8Array(65536);
    for (let v = 0; v < 65536; v++) scale16[v] = Math.round(v / 257);
  }
  return scale16;
};

/** Width and height from the IHDR chunk, which the PNG spec puts first, or why there is none. */
const pngHeaderSize = (bytes: Uint8Array): { width: number; height: number } | Failed => {
  if (bytes.length < 8 + 8 + 13) return "truncated PNG (no complete IHDR chunk)";
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const type = String.fromCharCode(bytes[12]!, bytes[13]!, bytes[14]!, bytes[15]!);
  if (type !== "IHDR" || view.getUint32(8) !== 13) {
    return "corrupt PNG (the first chunk is not a 13-byte IHDR)";
  }
  return { width: view.getUint32(16), height: view.getUint32(20) };
};

/** Why a declared size is refused (zero, or over the cap), or undefined when it is fine. */
const sizeProblem = (format: string, width: number, height: number, maxPixels: number): Failed | undefined =>
  width === 0 || height === 0
    ? `${format} declares a zero dimension (${width}x${height})`
    : width * height > maxPixels
    ? `${format} declares ${width}x${height} pixels, over the cap of ${maxPixels} ` +
      "(a decompression bomb, or raise SWAV_MAX_IMAGE_PIXELS)"
    : undefined;

const decodePng = (bytes: Uint8Array, maxPixels: number): RgbImage | Failed => {
  // The size comes from the header before fast-png inflates anything.
  const declared = pngHeaderSize(bytes);
  if (typeof declared === "string") return declared;
  const refused = sizeProblem("PNG", declared.width, declared.height, maxPixels);
  if (refused !== undefined) return refused;
  // Chunks and CRCs checked, IDAT inflated no further than the header allows (data/png_bounded.ts).
  const bounded = boundPng(bytes);
  if (typeof bounded === "string") return bounded;
  const { header, scanlines, expected } = bounded;
  if (scanlines.length < expected) {
    return `truncated PNG (its image data ends after ${scanlines.length} of ${expected} bytes)`;
  }
  if (header.depth === 8 && !header.interlaced && header.colour !== 3) {
    // The common case (8-bit grey or RGB, with or without alpha), unfiltered straight into RGB.
    const data = unfilterRgb8(header, scanlines);
    return typeof data === "string" ? data : { width: header.width, height: header.height, data };
  }
  let png: ReturnType<typeof parsePng>;
  try {
    png = parsePng(bounded.rebuild(), { checkCrc: false });
  } catch (cause) {
    return `corrupt or truncated PNG (${reasonOf(cause)})`;
  }
  const { width, height, depth, channels, palette } = png;
  if (width !== declared.width || height !== declared.height) {
    return `corrupt PNG (size ${width}x${height} differs from the header's ${declared.width}x${declared.height})`;
  }
  const out = new Uint8Array(width * height * 3);
  if (palette !== undefined) {
    // Palette indices (packed MSB first below 8 bits); alpha in the palette is dropped.
    const index = unpackRows(png.data as Uint8Array, width, height, depth);
    for (let p = 0; p < width * height; p++) {
      // An index past the palette is a spec violation that decoders (PIL included) render as black.
      const colour = palette[index[p]!];
      if (colour !== undefined) {
        out[p * 3] = colour[0]!;
        out[p * 3 + 1] = colour[1]!;
        out[p * 3 + 2] = colour[2]!;
      }
    }
    return { width, height, data: out };
  }
  const samples: ArrayLike<number> = depth === 16
    ? Uint8Array.from(png.data as Uint16Array, (v) => scale16Table()[v]!)
    : depth < 8
    ? unpackRows(png.data as Uint8Array, width, height, depth).map((v) => (v * 255) / ((1 << depth) - 1))
    : png.data;
  const grey = channels <= 2;
  for (let p = 0; p < width * height; p++) {
    const base = p * channels;
    out[p * 3] = samples[base]!;
    out[p * 3 + 1] = samples[grey ? base : base + 1]!;
    out[p * 3 + 2] = samples[grey ? base : base + 2]!;
  }
  return { width, height, data: out };
};

/** One value per pixel from rows packed MSB first at 1, 2 or 4 bits (8 bits: unchanged). */
const unpackRows = (data: Uint8Array, width: number, height: number, depth: number): Uint8Array => {
  if (depth >= 8) return data;
  const out = new Uint8Array(width * height);
  const rowBytes = Math.ceil((width * depth) / 8);
  const perByte = 8 / depth;
  const mask = (1 << depth) - 1;
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const byte = data[y * rowBytes + Math.floor(x / perByte)]!;
      out[y * width + x] = (byte >> ((perByte - 1 - (x % perByte)) * depth)) & mask;
    }
  }
  return out;
};

// ---------------------------------------------------------------------------------------------
// JPEG

/**
 * Width and height from the first SOF marker, found by walking the marker
 * segments from SOI, or why there is none. Both decoders run behind it, so a
 * bomb or a zero size (DNL) is refused before either allocates.
 */
export const jpegHeaderSize = (bytes: Uint8Array): { width: number; height: number } | Failed => {
  let at = 2; // after SOI
  while (at + 4 <= bytes.length) {
    // libjpeg skips stray bytes before a marker (with a warning); so does this walk.
    if (bytes[at] !== 0xff) {
      at++;
      continue;
    }
    const marker = bytes[at + 1]!;
    if (marker === 0xff) { // fill byte
      at++;
      continue;
    }
    // Standalone markers have no length field.
    if (marker === 0x01 || (marker >= 0xd0 && marker <= 0xd7)) {
      at += 2;
      continue;
    }
    if (marker === 0xd9 || marker === 0xda) return "corrupt JPEG (no frame header before the scan)";
    const length = (bytes[at + 2]! << 8) | bytes[at + 3]!;
    if (length < 2) return `corrupt JPEG (segment length ${length} at byte ${at})`;
    // SOF0..SOF15, except DHT (C4), JPG (C8) and DAC (CC).
    if (marker >= 0xc0 && marker <= 0xcf && marker !== 0xc4 && marker !== 0xc8 && marker !== 0xcc) {
      if (at + 9 > bytes.length) break;
      return {
        height: (bytes[at + 5]! << 8) | bytes[at + 6]!,
        width: (bytes[at + 7]! << 8) | bytes[at + 8]!,
      };
    }
    at += 2 + length;
  }
  return "corrupt or truncated JPEG (no frame header)";
};

const decodeJpeg = async (
  bytes: Uint8Array,
  decoder: JpegDecoder,
  maxPixels: number,
): Promise<RgbImage | Failed> => {
  const declared = jpegHeaderSize(bytes);
  if (typeof declared === "string") return declared;
  const refused = sizeProblem("JPEG", declared.width, declared.height, maxPixels);
  if (refused !== undefined) return refused;
  if (decoder !== "imagescript") {
    const turbo = turboJpeg();
    if (turbo) {
      const result = turbo.decode(bytes, maxPixels);
      if (result.kind === "image") return { width: result.width, height: result.height, data: result.data };
      if (result.kind === "error") return result.reason;
    } else if (decoder === "turbojpeg") {
      return `libjpeg-turbo is not available: ${turboJpegLoadError()}`;
    }
  }
  return await decodeJpegImagescript(bytes, declared);
};

const decodeJpegImagescript = async (
  bytes: Uint8Array,
  declared: { width: number; height: number },
): Promise<RgbImage | Failed> => {
  // imagescript's wasm decoder accepts some truncated streams (padding the rest grey);
  // a JPEG must end with the EOI marker, which PIL also insists on for a complete load.
  if (!hasEndMarker(bytes)) return "truncated JPEG (no end-of-image marker)";
  let image: Image;
  try {
    image = await Image.decode(bytes) as Image;
  } catch (cause) {
    return `corrupt JPEG: ${reasonOf(cause)}`;
  }
  const { width, height, bitmap } = image;
  if (width !== declared.width || height !== declared.height) {
    return `corrupt JPEG (decoded ${width}x${height}, the header says ${declared.width}x${declared.height})`;
  }
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

/** Which JPEG decoder `auto` uses on this thread (for reports and benchmarks). */
export const jpegBackend = (): "turbojpeg" | "imagescript" => turboJpeg() ? "turbojpeg" : "imagescript";
