/**
 * libjpeg-turbo's TurboJPEG API (`libturbojpeg.so.0`, Debian's `libturbojpeg0`)
 * through `Deno.dlopen`: the symbol table, the decompressor handle, and one
 * decode to packed RGB with PIL's settings (islow DCT, fancy upsampling).
 *
 * Failures are values, not exceptions: the image codec (`data/image_codec.ts`)
 * turns them into its `DecodeError` and falls back to imagescript where this
 * library cannot be loaded or cannot convert the colour space.
 */

const TJPF_RGB = 0;
const TJCS_CMYK = 3;
const TJCS_YCCK = 4;
const TJERR_FATAL = 1;

const SYMBOLS = {
  tjInitDecompress: { parameters: [], result: "pointer" },
  tjDestroy: { parameters: ["pointer"], result: "i32" },
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
} as const;

type Library = Deno.DynamicLibrary<typeof SYMBOLS>;

/** What one decode gives: the pixels, "unsupported" (CMYK/YCCK: decode elsewhere), or why it failed. */
export type TurboDecodeResult =
  | { readonly kind: "image"; readonly width: number; readonly height: number; readonly data: Uint8Array }
  | { readonly kind: "unsupported" }
  | { readonly kind: "error"; readonly reason: string };

export interface TurboJpeg {
  /** Decodes JPEG bytes to packed RGB; images over `maxPixels` are refused before allocating. */
  decode(bytes: Uint8Array, maxPixels: number): TurboDecodeResult;
}

/**
 * Decodes through `lib` with a fresh decompressor per image, destroyed after it.
 * A TurboJPEG handle keeps libjpeg's state after an error (a header error leaves
 * the next header read failing with the old marker, or a truncated file reading
 * the previous image's size), so a handle shared between decodes lets one corrupt
 * file break every later one; a handle costs one small allocation.
 */
const decompressor = (lib: Library): TurboJpeg | string => {
  // Probe once, so that a library that cannot make a handle is reported as unavailable.
  const probe = lib.symbols.tjInitDecompress();
  if (probe === null) return "tjInitDecompress failed";
  lib.symbols.tjDestroy(probe);
  const widthOut = new Int32Array(1);
  const heightOut = new Int32Array(1);
  const subsampOut = new Int32Array(1);
  const colourspaceOut = new Int32Array(1);
  const message = (handle: Deno.PointerValue) => {
    const pointer = lib.symbols.tjGetErrorStr2(handle);
    return pointer === null
      ? "unknown libjpeg-turbo error"
      : new Deno.UnsafePointerView(pointer).getCString();
  };
  const decodeWith = (
    handle: Deno.PointerObject,
    bytes: Uint8Array,
    maxPixels: number,
  ): TurboDecodeResult => {
    widthOut[0] = heightOut[0] = 0;
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
    ) return { kind: "error", reason: `corrupt JPEG header: ${message(handle)}` };
    const width = widthOut[0]!;
    const height = heightOut[0]!;
    if (width <= 0 || height <= 0 || width * height > maxPixels) {
      return {
        kind: "error",
        reason: `JPEG size ${width}x${height} out of range (at most ${maxPixels} pixels, both sides nonzero)`,
      };
    }
    // TurboJPEG cannot convert CMYK/YCCK to RGB; imagescript can.
    if (colourspaceOut[0] === TJCS_CMYK || colourspaceOut[0] === TJCS_YCCK) return { kind: "unsupported" };
    const data = new Uint8Array(width * height * 3);
    const status = lib.symbols.tjDecompress2(
      handle,
      bytes,
      BigInt(bytes.length),
      data,
      width,
      0,
      height,
      TJPF_RGB,
      0, // islow DCT, fancy upsampling: PIL's defaults
    );
    if (status !== 0) {
      const text = message(handle);
      // Warnings leave a complete image, except "Premature end of JPEG file": the
      // missing rows are filled grey, and a truncated file must not pass silently.
      if (lib.symbols.tjGetErrorCode(handle) === TJERR_FATAL) {
        return { kind: "error", reason: `corrupt JPEG: ${text}` };
      }
      if (/premature end/i.test(text)) return { kind: "error", reason: `truncated JPEG: ${text}` };
    }
    return { kind: "image", width, height, data };
  };
  return {
    decode(bytes, maxPixels) {
      const handle = lib.symbols.tjInitDecompress();
      if (handle === null) return { kind: "error", reason: "libjpeg-turbo: tjInitDecompress failed" };
      try {
        return decodeWith(handle, bytes, maxPixels);
      } finally {
        lib.symbols.tjDestroy(handle);
      }
    },
  };
};

/** Opens the library and a decompressor; a string says why it is unavailable. */
/** The libjpeg-turbo file: `SWAV_TURBOJPEG_LIB`, else the soname (Debian's libturbojpeg0). */
export const turboJpegLibrary = (): string => {
  try {
    return Deno.env.get("SWAV_TURBOJPEG_LIB") || "libturbojpeg.so.0";
  } catch {
    return "libturbojpeg.so.0"; // no --allow-env
  }
};

export const openTurboJpeg = (): TurboJpeg | string => {
  let lib: Library;
  try {
    lib = Deno.dlopen(turboJpegLibrary(), SYMBOLS);
  } catch (cause) {
    return cause instanceof Error ? cause.message : String(cause);
  }
  return decompressor(lib);
};

let turbo: TurboJpeg | null | undefined;
let loadError = "not tried";

/** libjpeg-turbo, loaded once per thread (each Worker has its own handle); null if unavailable. */
export const turboJpeg = (): TurboJpeg | null => {
  if (turbo !== undefined) return turbo;
  const opened = openTurboJpeg();
  if (typeof opened === "string") {
    loadError = opened;
    turbo = null;
  } else turbo = opened;
  return turbo;
};

/** Why `turboJpeg()` gave null on this thread ("not tried" before the first call). */
export const turboJpegLoadError = (): string => loadError;
