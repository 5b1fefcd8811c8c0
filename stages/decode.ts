/**
 * The decode stage: encoded image bytes (PNG or JPEG) to an RGB image, HWC, uint8.
 *
 * - PNG is parsed by fast-png (every colour type and bit depth, Adam7, CRCs
 *   checked), which keeps 16-bit samples whole; imagescript truncates them to
 *   the high byte, where PIL scales them by round(v / 257), as done here.
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
import { decode as parsePng } from "fast-png";
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
  if (isPng(bytes)) return decodePng(bytes);
  if (isJpeg(bytes)) return await decodeJpeg(bytes, options.jpeg ?? "auto");
  throw new Error(
    bytes.length === 0 ? "empty file" : "unrecognised image format (neither a PNG nor a JPEG signature)",
  );
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

const decodePng = (bytes: Uint8Array): RgbImage => {
  let png: ReturnType<typeof parsePng>;
  try {
    png = parsePng(bytes, { checkCrc: true });
  } catch (cause) {
    throw new Error(`corrupt or truncated PNG (${reasonOf(cause)})`);
  }
  const { width, height, depth, channels, palette } = png;
  if (width === 0 || height === 0 || width * height > MAX_PIXELS) {
    throw new Error(`PNG size ${width}x${height} out of range`);
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

/** The libjpeg-turbo file: `SWAV_TURBOJPEG_LIB`, else the soname (Debian's libturbojpeg0). */
export const turboJpegLibrary = (): string => {
  try {
    return Deno.env.get("SWAV_TURBOJPEG_LIB") || "libturbojpeg.so.0";
  } catch {
    return "libturbojpeg.so.0"; // no --allow-env
  }
};

const openTurboJpeg = (): TurboJpeg => {
  const lib = Deno.dlopen(turboJpegLibrary(), {
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

/** Why libjpeg-turbo did not load on this thread (after `jpegBackend()` returned "imagescript"). */
export const turboJpegLoadError = (): string => turboLoadError;

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
