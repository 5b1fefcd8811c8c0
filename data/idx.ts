/**
 * IDX files (MNIST, Fashion-MNIST): a big-endian header, then uint8 samples.
 *
 * Header: two zero bytes, a type byte (0x08 = unsigned byte, the only type these
 * data sets use), the number of dimensions, then one uint32 per dimension.
 * Files may be gzipped (`.gz`); they are small, so each is loaded once into memory.
 */

/** An IDX array: its dimensions and its samples, row-major. */
export interface IdxArray {
  readonly dims: readonly number[];
  readonly data: Uint8Array;
}

/** Gunzips with the built-in `DecompressionStream`; a corrupt or truncated stream throws. */
export const gunzip = async (bytes: Uint8Array): Promise<Uint8Array> => {
  const stream = new Blob([bytes as Uint8Array<ArrayBuffer>]).stream().pipeThrough(
    new DecompressionStream("gzip"),
  );
  return new Uint8Array(await new Response(stream).arrayBuffer());
};

const isGzip = (bytes: Uint8Array) => bytes.length >= 2 && bytes[0] === 0x1f && bytes[1] === 0x8b;

/** Parses IDX bytes (gzipped or raw); throws `Error` with the reason on a bad file. */
export const parseIdx = async (input: Uint8Array): Promise<IdxArray> => {
  let bytes = input;
  if (isGzip(input)) {
    try {
      bytes = await gunzip(input);
    } catch (cause) {
      throw new Error(`corrupt gzip stream: ${cause instanceof Error ? cause.message : String(cause)}`);
    }
  }
  if (bytes.length < 4 || bytes[0] !== 0 || bytes[1] !== 0) {
    throw new Error("not an IDX file (bad magic number)");
  }
  if (bytes[2] !== 0x08) {
    throw new Error(`unsupported IDX element type 0x${bytes[2].toString(16)} (need uint8)`);
  }
  const rank = bytes[3];
  const headerLength = 4 + 4 * rank;
  if (rank === 0 || bytes.length < headerLength) throw new Error("truncated IDX header");
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const dims = Array.from({ length: rank }, (_, i) => view.getUint32(4 + 4 * i));
  const count = dims.reduce((a, b) => a * b, 1);
  if (bytes.length - headerLength < count) {
    throw new Error(`truncated IDX data (${bytes.length - headerLength} of ${count} bytes)`);
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
