/**
 * NumPy `.npy` files (format version 1.0; 2.0 and 3.0 are read too), so that
 * extracted features open directly in NumPy (`numpy.load`), PyTorch, JAX or
 * scikit-learn.
 *
 * Layout: the magic `\x93NUMPY`, the version bytes, a little-endian header
 * length (uint16 in 1.0, uint32 in 2.0/3.0), an ASCII Python dict literal
 * `{'descr': '<f4', 'fortran_order': False, 'shape': (N, D), }` padded with
 * spaces and a newline so the data starts 64-byte aligned, then the values in
 * C (row-major) order.
 *
 * Every entry point is an Effect failing with `NpyError` (I/O included).
 */
import { Effect, Schema } from "effect";
import { readRegularFile } from "./bounded_read.ts";
import { reasonOf } from "./errors.ts";

/** The element types written and read here (little-endian). */
export type NpyDtype = "<f4" | "<f8" | "<i4" | "<i8" | "|u1" | "|i1";

/** The typed array holding an array's elements, one type per `NpyDtype`. */
export type NpyValues = Float32Array | Float64Array | Int32Array | BigInt64Array | Uint8Array | Int8Array;

/** A NumPy array in memory: element type, shape and the elements in C (row-major) order. */
export interface NpyArray {
  /** Element type. */
  readonly dtype: NpyDtype;
  /** Dimensions, outermost first. */
  readonly shape: readonly number[];
  /** The elements, row-major. */
  readonly values: NpyValues;
}

/** An array that cannot be written, or a file that is not a NumPy array this module can read. */
export class NpyError extends Schema.TaggedError<NpyError>()("NpyError", {
  /** The file, or "<bytes>" when parsing bytes in memory. */
  path: Schema.String,
  reason: Schema.String,
}) {
  /** The path and the reason, on one line. */
  override get message(): string {
    return `${this.path}: ${this.reason}`;
  }
}

const fail = (reason: string, path = "<bytes>") => Effect.fail(new NpyError({ path, reason }));

const MAGIC = [0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59]; // \x93NUMPY
const ALIGN = 64;

const dtypeOf = (values: NpyValues): NpyDtype => {
  if (values instanceof Float32Array) return "<f4";
  if (values instanceof Float64Array) return "<f8";
  if (values instanceof Int32Array) return "<i4";
  if (values instanceof BigInt64Array) return "<i8";
  if (values instanceof Uint8Array) return "|u1";
  return "|i1";
};

const bytesPer: Record<NpyDtype, number> = { "<f4": 4, "<f8": 8, "<i4": 4, "<i8": 8, "|u1": 1, "|i1": 1 };

/** Python's repr of a shape tuple: `()`, `(3,)`, `(3, 4)`. */
const shapeRepr = (shape: readonly number[]): string =>
  shape.length === 1 ? `(${shape[0]},)` : `(${shape.join(", ")})`;

/** Encodes an array as `.npy` version 1.0 bytes (C order). */
export const encodeNpy = (
  values: NpyValues,
  shape: readonly number[],
): Effect.Effect<Uint8Array, NpyError> => {
  const count = shape.reduce((a, b) => a * b, 1);
  if (shape.some((d) => !Number.isInteger(d) || d < 0)) return fail(`bad shape [${shape}]`);
  if (count !== values.length) {
    return fail(`${values.length} values for shape [${shape}] (${count} expected)`);
  }
  const dict = `{'descr': '${dtypeOf(values)}', 'fortran_order': False, 'shape': ${shapeRepr(shape)}, }`;
  // magic (6) + version (2) + length (2) + dict + padding + "\n" is a multiple of ALIGN.
  const unpadded = 10 + dict.length + 1;
  const header = dict + " ".repeat((ALIGN - (unpadded % ALIGN)) % ALIGN) + "\n";
  if (header.length > 0xffff) return fail("header too long for format 1.0");
  const bytes = new Uint8Array(10 + header.length + values.byteLength);
  bytes.set(MAGIC, 0);
  bytes[6] = 1;
  bytes[7] = 0;
  new DataView(bytes.buffer).setUint16(8, header.length, true);
  for (let i = 0; i < header.length; i++) bytes[10 + i] = header.charCodeAt(i);
  // Typed arrays are little-endian on every platform Deno runs on (x86-64, arm64).
  bytes.set(new Uint8Array(values.buffer, values.byteOffset, values.byteLength), 10 + header.length);
  return Effect.succeed(bytes);
};

/** Parses `.npy` bytes (versions 1.0-3.0, C order, the dtypes of `NpyDtype`). */
export const decodeNpy = (bytes: Uint8Array, path = "<bytes>"): Effect.Effect<NpyArray, NpyError> =>
  Effect.suspend(() => {
    const parsed = parseNpy(bytes);
    return typeof parsed === "string" ? fail(parsed, path) : Effect.succeed(parsed);
  });

/** The parser: the array, or why the bytes are not one. */
const parseNpy = (bytes: Uint8Array): NpyArray | string => {
  if (bytes.length < 10 || MAGIC.some((b, i) => bytes[i] !== b)) {
    return "not a .npy file (bad magic)";
  }
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const major = bytes[6]!;
  let headerStart: number;
  let headerLength: number;
  if (major === 1) {
    headerLength = view.getUint16(8, true);
    headerStart = 10;
  } else if (major === 2 || major === 3) {
    if (bytes.length < 12) return "truncated header";
    headerLength = view.getUint32(8, true);
    headerStart = 12;
  } else {
    return `format version ${major}.${bytes[7]} is not supported`;
  }
  if (headerStart + headerLength > bytes.length) return "truncated header";
  const header = new TextDecoder(major === 3 ? "utf-8" : "latin1").decode(
    bytes.subarray(headerStart, headerStart + headerLength),
  );
  const descr = /'descr'\s*:\s*'([^']+)'/.exec(header)?.[1];
  const fortran = /'fortran_order'\s*:\s*(True|False)/.exec(header)?.[1];
  const shapeText = /'shape'\s*:\s*\(([^)]*)\)/.exec(header)?.[1];
  if (descr === undefined || fortran === undefined || shapeText === undefined) {
    return `malformed header ${JSON.stringify(header.trim())}`;
  }
  // '<u1' and '|u1' are the same thing; NumPy writes '|' for one-byte types.
  const dtype = (descr.length === 3 && descr[2] === "1" ? `|${descr.slice(1)}` : descr) as NpyDtype;
  if (!(dtype in bytesPer)) {
    return `dtype ${descr} is not supported (supported: ${Object.keys(bytesPer).join(", ")})`;
  }
  if (fortran === "True") return "Fortran-ordered arrays are not supported";
  const shape = shapeText.split(",").map((s) => s.trim()).filter((s) => s !== "").map(Number);
  if (shape.some((d) => !Number.isInteger(d) || d < 0)) return `bad shape (${shapeText})`;
  const count = shape.reduce((a, b) => a * b, 1);
  const start = headerStart + headerLength;
  const end = start + count * bytesPer[dtype];
  if (end > bytes.length) return `truncated data: ${count} values of ${dtype} expected`;
  // Copy into an aligned buffer of its own (the data offset need not suit the element size).
  const raw = bytes.slice(start, end).buffer;
  const values: NpyValues = dtype === "<f4"
    ? new Float32Array(raw)
    : dtype === "<f8"
    ? new Float64Array(raw)
    : dtype === "<i4"
    ? new Int32Array(raw)
    : dtype === "<i8"
    ? new BigInt64Array(raw)
    : dtype === "|u1"
    ? new Uint8Array(raw)
    : new Int8Array(raw);
  return { dtype, shape, values };
};

/** Writes an array to a `.npy` file. */
export const writeNpy = (
  path: string,
  values: NpyValues,
  shape: readonly number[],
): Effect.Effect<void, NpyError> =>
  Effect.flatMap(
    Effect.mapError(encodeNpy(values, shape), (error) => new NpyError({ path, reason: error.reason })),
    (bytes) =>
      Effect.tryPromise({
        try: () => Deno.writeFile(path, bytes),
        catch: (cause) => new NpyError({ path, reason: `cannot write: ${reasonOf(cause)}` }),
      }),
  );

/** The largest `.npy` file read (4 GiB: features of 1.28 M images x 768 float32 values). */
const MAX_NPY_BYTES = 4 * 2 ** 30;

/** Reads a `.npy` file. */
export const readNpy = (path: string): Effect.Effect<NpyArray, NpyError> =>
  Effect.flatMap(
    Effect.mapError(
      readRegularFile(path, MAX_NPY_BYTES),
      (error) => new NpyError({ path, reason: `cannot read: ${error.reason}` }),
    ),
    (bytes) => decodeNpy(bytes, path),
  );
