/**
 * IDX files (MNIST, Fashion-MNIST): a big-endian header, then uint8 samples.
 *
 * Header: two zero bytes, a type byte (0x08 = unsigned byte, the only type these
 * data sets use), the number of dimensions, then one uint32 per dimension.
 * Files may be gzipped (`.gz`); they are small, so each is loaded once into memory.
 */
import { Effect, Schema } from "effect";
import { reasonOf } from "./errors.ts";

/** An IDX array: its dimensions and its samples, row-major. */
export interface IdxArray {
  readonly dims: readonly number[];
  readonly data: Uint8Array;
}

/** Gunzips with the built-in `DecompressionStream`; a corrupt or truncated stream rejects. */
export const gunzip = async (bytes: Uint8Array): Promise<Uint8Array> => {
  const stream = new Blob([bytes as Uint8Array<ArrayBuffer>]).stream().pipeThrough(
    new DecompressionStream("gzip"),
  );
  return new Uint8Array(await new Response(stream).arrayBuffer());
};

const isGzip = (bytes: Uint8Array) => bytes.length >= 2 && bytes[0] === 0x1f && bytes[1] === 0x8b;

/** An IDX file that cannot be read: `path` names it, `reason` says why. */
export class IdxError extends Schema.TaggedError<IdxError>()("IdxError", {
  path: Schema.String,
  reason: Schema.String,
}) {
  override get message(): string {
    return `${this.path}: ${this.reason}`;
  }
}

/** Parses IDX bytes (gzipped or raw); `path` only labels the error. */
export const parseIdx = (input: Uint8Array, path = "<bytes>"): Effect.Effect<IdxArray, IdxError> =>
  Effect.gen(function* () {
    const bytes = isGzip(input)
      ? yield* Effect.tryPromise({
        try: () => gunzip(input),
        catch: (cause) => new IdxError({ path, reason: `corrupt gzip stream: ${reasonOf(cause)}` }),
      })
      : input;
    const parsed = parseRaw(bytes);
    return typeof parsed === "string" ? yield* new IdxError({ path, reason: parsed }) : parsed;
  });

/** The parser of raw (not gzipped) IDX bytes: the array, or why the bytes are not one. */
const parseRaw = (bytes: Uint8Array): IdxArray | string => {
  if (bytes.length < 4 || bytes[0] !== 0 || bytes[1] !== 0) return "not an IDX file (bad magic number)";
  if (bytes[2] !== 0x08) return `unsupported IDX element type 0x${bytes[2].toString(16)} (need uint8)`;
  const rank = bytes[3];
  const headerLength = 4 + 4 * rank;
  if (rank === 0 || bytes.length < headerLength) return "truncated IDX header";
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const dims = Array.from({ length: rank }, (_, i) => view.getUint32(4 + 4 * i));
  const count = dims.reduce((a, b) => a * b, 1);
  if (bytes.length - headerLength < count) {
    return `truncated IDX data (${bytes.length - headerLength} of ${count} bytes)`;
  }
  return { dims, data: bytes.subarray(headerLength, headerLength + count) };
};

/** Writes an IDX uint8 file (used by tests and tools); `gzip` compresses it. */
export const encodeIdx = async (
  dims: readonly number[],
  data: Uint8Array,
  gzip = false,
): Promise<Uint8Array> => {
  const out = new Uint8Array(4 + 4 * dims.length + data.length);
  const view = new DataView(out.buffer);
  out[2] = 0x08;
  out[3] = dims.length;
  dims.forEach((d, i) => view.setUint32(4 + 4 * i, d));
  out.set(data, 4 + 4 * dims.length);
  if (!gzip) return out;
  const stream = new Blob([out]).stream().pipeThrough(new CompressionStream("gzip"));
  return new Uint8Array(await new Response(stream).arrayBuffer());
};
