/**
 * IDX files (MNIST, Fashion-MNIST): a big-endian header, then uint8 samples.
 *
 * Header: two zero bytes, a type byte (0x08 = unsigned byte, the only type these
 * data sets use), the number of dimensions, then one uint32 per dimension.
 * Files may be gzipped (`.gz`); they are small, so each is loaded once into memory.
 *
 * Every size comes from the header and is bounded: a gzipped file is inflated
 * as a stream and stopped as soon as it passes the size its header promises
 * (a few MB of gzip can hold gigabytes of zeros), and no file may hold more
 * than `MAX_IDX_BYTES`. Bytes after the promised data are an error, raw or gzipped.
 */
import { Effect, Schema } from "effect";
import { reasonOf } from "./errors.ts";

/** An IDX array: its dimensions and its samples, row-major. */
export interface IdxArray {
  readonly dims: readonly number[];
  readonly data: Uint8Array;
}

/**
 * Largest IDX file accepted, header included, after inflation: 2 GiB, far above
 * the largest IDX data set (EMNIST ByClass, about 550 MB of training images).
 */
export const MAX_IDX_BYTES = 2 ** 31;

/** Compressed bytes handed to the inflater at a time. */
const GZIP_PIECE = 4096;

/**
 * Gunzips with the built-in `DecompressionStream`, as a stream: `expected(head)`
 * is called on the bytes inflated so far and returns the total size they promise
 * (or undefined while it cannot tell yet, or a string saying why the head is
 * bad). Inflation stops, and the promise resolves to a reason string, as soon as
 * the output passes that size or `cap`; a corrupt or truncated stream rejects.
 */
export const gunzipBounded = async (
  bytes: Uint8Array,
  cap: number,
  expected: (head: Uint8Array) => number | string | undefined,
): Promise<Uint8Array | string> => {
  // Fed in small pieces: deflate expands at most about 1032:1, so one 4 KB piece inflates to at
  // most about 4 MB before the size is checked (a Blob's stream hands over far larger pieces).
  let fed = 0;
  const input = new ReadableStream<Uint8Array<ArrayBuffer>>({
    pull(controller) {
      if (fed >= bytes.length) return controller.close();
      controller.enqueue(bytes.slice(fed, fed + GZIP_PIECE) as Uint8Array<ArrayBuffer>);
      fed += GZIP_PIECE;
    },
  }, { highWaterMark: 0 });
  const reader = input.pipeThrough(new DecompressionStream("gzip")).getReader();
  const chunks: Uint8Array[] = [];
  let total = 0;
  let limit: number | undefined;
  try {
    while (true) {
      const { done, value } = await reader.read();
      if (done) break;
      chunks.push(value);
      total += value.length;
      if (limit === undefined) {
        const promised = expected(chunks.length === 1 ? value : concat(chunks, total));
        if (typeof promised === "string") return promised;
        if (promised !== undefined && promised > cap) {
          return `header promises ${promised} bytes, over the cap of ${cap}`;
        }
        limit = promised;
      }
      if (total > (limit ?? cap)) {
        return limit === undefined
          ? `gzip stream inflates past the cap of ${cap} bytes before a complete header`
          : `gzip stream inflates past the ${limit} bytes its header promises (trailing data)`;
      }
    }
  } finally {
    // Stops the inflation where it is (on success this is a no-op).
    await reader.cancel().catch(() => undefined);
  }
  return concat(chunks, total);
};

const concat = (chunks: Uint8Array[], total: number): Uint8Array => {
  if (chunks.length === 1) return chunks[0]!;
  const out = new Uint8Array(total);
  let at = 0;
  for (const chunk of chunks) {
    out.set(chunk, at);
    at += chunk.length;
  }
  return out;
};

/** The total size (header + data) that an IDX header promises, undefined until the header is complete. */
const promisedSize = (head: Uint8Array): number | string | undefined => {
  if (head.length < 4) return undefined;
  if (head[0] !== 0 || head[1] !== 0) return "not an IDX file (bad magic number)";
  if (head[2] !== 0x08) return `unsupported IDX element type 0x${head[2]!.toString(16)} (need uint8)`;
  const rank = head[3]!;
  if (rank === 0) return "IDX header declares no dimensions";
  const headerLength = 4 + 4 * rank;
  if (head.length < headerLength) return undefined;
  const view = new DataView(head.buffer, head.byteOffset, head.byteLength);
  let count = 1;
  for (let i = 0; i < rank; i++) count *= view.getUint32(4 + 4 * i);
  return headerLength + count;
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
        try: () => gunzipBounded(input, MAX_IDX_BYTES, promisedSize),
        catch: (cause) => new IdxError({ path, reason: `corrupt gzip stream: ${reasonOf(cause)}` }),
      })
      : input;
    if (typeof bytes === "string") return yield* new IdxError({ path, reason: bytes });
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
  if (headerLength + count > MAX_IDX_BYTES) {
    return `IDX header declares [${dims}] (${count} bytes), over the cap of ${MAX_IDX_BYTES} bytes`;
  }
  if (bytes.length - headerLength < count) {
    return `truncated IDX data (${bytes.length - headerLength} of ${count} bytes)`;
  }
  if (bytes.length - headerLength > count) {
    return `${
      bytes.length - headerLength - count
    } bytes after the ${count} bytes of data its header declares`;
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
