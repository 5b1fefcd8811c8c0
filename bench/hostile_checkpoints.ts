/**
 * The hostile PyTorch checkpoints of the second reliability round, made from bytes (no torch
 * needed), shared by test/hostile_checkpoint_test.ts and bench/reliability_probe.ts. Each is
 * small; on the old reader each hung, exhausted memory or time, or crashed. The layouts follow
 * what `torch.save` writes (a zip of `<name>/data.pkl`, `<name>/byteorder`, `<name>/data/<key>`;
 * protocol-2 pickles calling `torch._utils._rebuild_tensor_v2`), checked against torch 1.13.
 */
import { deflateSync } from "fflate";

// ---- pickles ----------------------------------------------------------------------------------------

const enc = new TextEncoder();
const cat = (parts: ReadonlyArray<Uint8Array | number[]>): Uint8Array => {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
};
const le32 = (v: number) => [v & 0xff, (v >>> 8) & 0xff, (v >>> 16) & 0xff, (v >>> 24) & 0xff];
const le16 = (v: number) => [v & 0xff, (v >>> 8) & 0xff];
/** BINUNICODE. */
const str = (s: string) => {
  const b = enc.encode(s);
  return cat([[0x58, ...le32(b.length)], b]);
};
/** BININT (signed 32-bit). */
const int = (v: number) => [0x4a, ...le32(v)];
const MARK = [0x28], TUPLE = [0x74], REDUCE = [0x52], SETITEM = [0x73], STOP = [0x2e];
const global = (module: string, name: string) => enc.encode(`c${module}\n${name}\n`);

/** A tensor record: `_rebuild_tensor_v2(storage(key, numel floats), offset, shape, stride, False, {})`. */
export const tensorPickle = (
  key: string,
  numel: number,
  shape: readonly number[],
  stride: readonly number[],
  offset = 0,
  storageType: Uint8Array | number[] = global("torch", "FloatStorage"),
): Uint8Array =>
  cat([
    global("torch._utils", "_rebuild_tensor_v2"),
    MARK,
    MARK,
    str("storage"),
    storageType,
    str(key),
    str("cpu"),
    int(numel),
    TUPLE,
    [0x51], // BINPERSID
    int(offset),
    MARK,
    ...shape.map(int),
    TUPLE,
    MARK,
    ...stride.map(int),
    TUPLE,
    [0x89], // NEWFALSE
    [0x7d], // EMPTY_DICT
    TUPLE,
    REDUCE,
  ]);

/** `{key: value, ...}` as a protocol-2 pickle, values given as pickle bytes. */
export const dictPickle = (items: ReadonlyArray<readonly [string, Uint8Array | number[]]>): Uint8Array =>
  cat([[0x80, 0x02, 0x7d], ...items.flatMap(([k, v]) => [str(k), v, SETITEM]), STOP]);

// ---- zips -------------------------------------------------------------------------------------------

export interface ZipPart {
  readonly name: string;
  readonly data: Uint8Array;
  /** Deflate it (default: stored, as torch.save does). */
  readonly deflate?: boolean;
}

/** A plain zip (no data descriptors, no zip64), entries in order; the offsets of its records. */
export const zip = (parts: readonly ZipPart[]) => {
  const locals: Uint8Array[] = [];
  const centrals: Uint8Array[] = [];
  const offsets: number[] = [];
  let at = 0;
  for (const part of parts) {
    const body = part.deflate ? deflateSync(part.data) : part.data;
    const name = enc.encode(part.name);
    const method = part.deflate ? 8 : 0;
    const sizes = [...le32(0), ...le32(body.length), ...le32(part.data.length)]; // crc (unchecked), sizes
    const local = cat([
      [0x50, 0x4b, 3, 4, 20, 0, 0, 0, ...le16(method), 0, 0, 0, 0],
      sizes,
      le16(name.length),
      [0, 0],
      name,
      body,
    ]);
    const central = cat([
      [0x50, 0x4b, 1, 2, 20, 0, 20, 0, 0, 0, ...le16(method), 0, 0, 0, 0],
      sizes,
      le16(name.length),
      [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
      le32(at),
      name,
    ]);
    offsets.push(at);
    locals.push(local);
    centrals.push(central);
    at += local.length;
  }
  const cd = cat(centrals);
  const eocd = cat([
    [0x50, 0x4b, 5, 6, 0, 0, 0, 0],
    le16(parts.length),
    le16(parts.length),
    le32(cd.length),
    le32(at),
    [0, 0],
  ]);
  return {
    bytes: cat([...locals, cd, eocd]),
    localOffsets: offsets,
    centralOffset: at,
    eocdOffset: at + cd.length,
  };
};

/** A torch.save-like zip of `archive/data.pkl` holding `pickle`, and float storages by key. */
export const torchZip = (pickle: Uint8Array, storages: ReadonlyArray<readonly [string, Uint8Array]> = []) =>
  zip([
    { name: "archive/data.pkl", data: pickle },
    { name: "archive/byteorder", data: enc.encode("little") },
    ...storages.map(([key, data]) => ({ name: `archive/data/${key}`, data })),
  ]);

const floats = (values: number[]) => new Uint8Array(Float32Array.from(values).buffer);

// ---- the hostile cases ------------------------------------------------------------------------------

/**
 * The zip64 loop: the end record says 0xFFFF entries on this disk and 2 in total, and a zip64
 * record points at a second directory whose entry has size 0xFFFFFFFF and no zip64 extra field.
 * fflate's zip64 scan looped forever on it.
 */
export const zip64Loop = (): Uint8Array => {
  // A valid first directory of two entries (data.pkl, byteorder), which the old check walked.
  const inner = torchZip(dictPickle([]));
  const b = inner.bytes;
  const body = b.subarray(0, inner.centralOffset);
  const firstCentral = b.subarray(inner.centralOffset, inner.eocdOffset);
  // A second directory of one entry claiming 0xFFFFFFFF bytes, no extra field.
  const second = firstCentral.slice(0, 46 + "archive/data.pkl".length);
  second.set(le32(0xffffffff), 20);
  second.set(le32(0xffffffff), 24);
  const secondAt = body.length + firstCentral.length;
  const recordAt = secondAt + second.length;
  const record = cat([
    [0x50, 0x4b, 6, 6],
    le32(44),
    le32(0),
    [45, 0, 45, 0],
    le32(0),
    le32(0),
    le32(1),
    le32(0), // entries on this disk (64-bit)
    le32(1),
    le32(0), // entries in total
    le32(second.length),
    le32(0),
    le32(secondAt),
    le32(0),
  ]);
  const locator = cat([[0x50, 0x4b, 6, 7], le32(0), le32(recordAt), le32(0), le32(1)]);
  const eocd = cat([
    [0x50, 0x4b, 5, 6, 0, 0, 0, 0],
    le16(0xffff),
    le16(2),
    le32(firstCentral.length),
    le32(body.length),
    [0, 0],
  ]);
  return cat([body, firstCentral, second, record, locator, eocd]);
};

/** Four `torch.zeros(1).expand(2**27)` tensors: 2^29 elements from one 4-byte storage. */
export const strideZero = (count = 4, length = 2 ** 27): Uint8Array =>
  torchZip(
    dictPickle(
      Array.from({ length: count }, (_, i) => [`w${i}`, tensorPickle("0", 1, [length], [0])] as const),
    ),
    [["0", floats([0.5])]],
  ).bytes;

/**
 * `entries` directory entries that all point at one deflated storage of `mib` MiB of zeros
 * (the old reader inflated it once per entry).
 */
export const overlappingEntries = (entries = 32, mib = 64): Uint8Array => {
  const pickle = dictPickle(
    Array.from(
      { length: entries },
      (_, i) => [`w${i}`, tensorPickle(String(i), mib * 2 ** 18, [mib * 2 ** 18], [1])],
    ),
  );
  const base = zip([
    { name: "archive/data.pkl", data: pickle },
    { name: "archive/data/0", data: new Uint8Array(mib * 2 ** 20), deflate: true },
  ]);
  const b = base.bytes;
  const central = b.subarray(base.centralOffset, base.eocdOffset);
  const pklCentralLength = 46 + "archive/data.pkl".length;
  const storageCentral = central.subarray(pklCentralLength);
  const copies: Uint8Array[] = [central.subarray(0, pklCentralLength)];
  for (let i = 0; i < entries; i++) {
    // Same local header offset and sizes; the name "archive/data/<i>" (one character per digit).
    const name = enc.encode(`archive/data/${i}`);
    const copy = cat([storageCentral.subarray(0, 46), name]);
    copy.set(le16(name.length), 28);
    copies.push(copy);
  }
  const cd = cat(copies);
  const eocd = cat([
    [0x50, 0x4b, 5, 6, 0, 0, 0, 0],
    le16(entries + 1),
    le16(entries + 1),
    le32(cd.length),
    le32(base.centralOffset),
    [0, 0],
  ]);
  return cat([b.subarray(0, base.centralOffset), cd, eocd]);
};

/** A storage entry whose bytes lie inside another (stored) entry's bytes. */
export const nestedEntry = (): Uint8Array => {
  const inner = zip([{ name: "archive/data/0", data: floats([1, 2]) }]);
  const innerLocal = inner.bytes.subarray(0, inner.centralOffset);
  const innerCentral = inner.bytes.slice(inner.centralOffset, inner.eocdOffset);
  const outer = torchZip(dictPickle([["w", tensorPickle("0", 2, [2], [1])]]), [["1", innerLocal]]);
  const b = outer.bytes;
  const hostLocal = outer.localOffsets[2]!;
  const hostData = hostLocal + 30 + "archive/data/1".length;
  innerCentral.set(le32(hostData), 42);
  const cd = cat([b.subarray(outer.centralOffset, outer.eocdOffset), innerCentral]);
  const eocd = cat([
    [0x50, 0x4b, 5, 6, 0, 0, 0, 0],
    le16(4),
    le16(4),
    le32(cd.length),
    le32(outer.centralOffset),
    [0, 0],
  ]);
  return cat([b.subarray(0, outer.centralOffset), cd, eocd]);
};

/** A storage whose local header says other sizes than its directory entry. */
export const sizesDisagree = (): Uint8Array => {
  const z = torchZip(dictPickle([["w", tensorPickle("0", 2, [2], [1])]]), [["0", floats([1, 2])]]);
  const b = z.bytes.slice();
  const local = z.localOffsets[2]!;
  b.set(le32(4), local + 18);
  b.set(le32(4), local + 22);
  return b;
};

/** A deflated storage that inflates to more than its declared size (declared 8 bytes, holds 4 MiB). */
export const inflatesPastDeclared = (): Uint8Array => {
  const z = zip([
    { name: "archive/data.pkl", data: dictPickle([["w", tensorPickle("0", 2, [2], [1])]]) },
    { name: "archive/data/0", data: new Uint8Array(4 * 2 ** 20), deflate: true },
  ]);
  const b = z.bytes.slice();
  // The declared inflated size, in both headers: 8 bytes (two floats).
  b.set(le32(8), z.localOffsets[1]! + 22);
  b.set(le32(8), z.centralOffset + 46 + "archive/data.pkl".length + 24);
  return b;
};

/** A LONG4 integer of `bytes` bytes as a tensor's offset (its decoder was quadratic: 512 KB took 46 s). */
export const long4 = (bytes = 2 ** 20): Uint8Array => {
  const big = cat([[0x8b, ...le32(bytes)], new Uint8Array(bytes).fill(0x11)]);
  const tensor = tensorPickle("0", 1, [1], [1]);
  // Replace the offset BININT 0 by the LONG4: rebuild the record by hand.
  const at = findBytes(tensor, [0x51, ...int(0)]) + 1;
  const record = cat([tensor.subarray(0, at), big, tensor.subarray(at + 5)]);
  return torchZip(dictPickle([["w", record]]), [["0", floats([1])]]).bytes;
};

/**
 * A tensor whose shape is a list shared `depth` times over (L0 = [1, 1], Lk+1 = [Lk, Lk], built
 * with memo gets): printing it expanded 2^depth items into the "one-line" error.
 */
export const sharedListShape = (depth = 40): Uint8Array => {
  // [1, 1] -> memo 0, then POP: only the last list stays on the stack.
  const parts: Array<Uint8Array | number[]> = [[0x5d, 0x28, 0x4b, 1, 0x4b, 1, 0x65, 0x71, 0, 0x30]];
  for (let k = 1; k <= depth; k++) {
    // EMPTY_LIST MARK BINGET k-1 BINGET k-1 APPENDS BINPUT k [POP] (memo indices fit one byte)
    parts.push([0x5d, 0x28, 0x68, k - 1, 0x68, k - 1, 0x65, 0x71, k, ...(k < depth ? [0x30] : [])]);
  }
  const shapeList = cat(parts);
  const tensor = tensorPickle("0", 1, [1], [1]);
  // Replace the shape tuple (MARK BININT 1 TUPLE) by the shared list.
  const shapeAt = findBytes(tensor, [...MARK, ...int(1), ...TUPLE]);
  const record = cat([tensor.subarray(0, shapeAt), shapeList, tensor.subarray(shapeAt + 7)]);
  return torchZip(dictPickle([["w", record]]), [["0", floats([1])]]).bytes;
};

/**
 * A list dressed as a tensor record by BUILD (`{"kind": "tensor", "shape": 5, ...}` copied onto
 * it): the old reader took it for one of its own records and crashed as an internal error.
 */
export const fakedTensorRecord = (): Uint8Array => {
  const state = cat([
    [0x7d],
    MARK,
    str("kind"),
    str("tensor"),
    str("shape"),
    int(5),
    str("stride"),
    str("x"),
    [0x75],
  ]);
  const faked = cat([[0x5d], state, [0x62]]); // EMPTY_LIST, the dict, BUILD
  return torchZip(dictPickle([["w", faked]]), []).bytes;
};

/**
 * A storage type changed by BUILD (`torch.FloatStorage` given `dtype = "evil"`) and then used by a
 * tensor: the old reader trusted its fields and crashed as an internal error.
 */
export const buildOnStorageType = (): Uint8Array => {
  const changed = cat([global("torch", "FloatStorage"), [0x7d], MARK, str("dtype"), str("evil"), [0x75], [
    0x62,
  ]]);
  return torchZip(dictPickle([["w", tensorPickle("0", 1, [1], [1], 0, changed)]]), [["0", floats([1])]])
    .bytes;
};

const findBytes = (b: Uint8Array, pattern: number[]): number => {
  outer: for (let i = 0; i + pattern.length <= b.length; i++) {
    for (let j = 0; j < pattern.length; j++) if (b[i + j] !== pattern[j]) continue outer;
    return i;
  }
  throw new Error("pattern not found");
};

/** `views` tensors of `numel` elements, each viewing the whole of one stored storage. */
export const manyViews = (views: number, numel: number): Uint8Array =>
  torchZip(
    dictPickle(
      Array.from({ length: views }, (_, i) => [`v${i}`, tensorPickle("0", numel, [numel], [1])] as const),
    ),
    [["0", new Uint8Array(4 * numel)]],
  ).bytes;

/**
 * A valid but slow checkpoint: `entries` transposed `side` x `side` bfloat16 tensors (strides
 * [1, side], as a saved `w.t()` has), each of its own deflated storage of zeros (about 1/1000 of
 * its size in the file): loading it inflates and converts `entries * side^2` elements one by one.
 */
export const slowToLoad = (entries = 3, side = 4096): Uint8Array => {
  const numel = side * side;
  const zeros = deflateSync(new Uint8Array(numel * 2));
  const bfloat16 = global("torch", "BFloat16Storage");
  const z = zip([
    {
      name: "archive/data.pkl",
      data: dictPickle(
        Array.from(
          { length: entries },
          (_, i) => [`w${i}`, tensorPickle(String(i), numel, [side, side], [1, side], 0, bfloat16)],
        ),
      ),
    },
    ...Array.from({ length: entries }, (_, i) => ({ name: `archive/data/${i}`, data: zeros })),
  ]);
  // Mark the storages deflated: their bytes are the deflated zeros, their inflated size numel * 2.
  const b = z.bytes;
  for (let i = 0; i < entries; i++) {
    const local = z.localOffsets[i + 1]!;
    b.set(le16(8), local + 8);
    b.set(le32(numel * 2), local + 22);
  }
  let o = z.centralOffset;
  for (let i = 0; i <= entries; i++) {
    const nameLength = b[o + 28]! | (b[o + 29]! << 8);
    if (i > 0) {
      b.set(le16(8), o + 10);
      b.set(le32(numel * 2), o + 24);
    }
    o += 46 + nameLength;
  }
  return b;
};

/** A good small checkpoint: `w` = [1, 2, 3] and an expanded `e` = torch.tensor([7.]).expand(5). */
export const goodSmall = (): Uint8Array =>
  torchZip(
    dictPickle([["w", tensorPickle("0", 3, [3], [1])], ["e", tensorPickle("1", 1, [5], [0])]]),
    [["0", floats([1, 2, 3])], ["1", floats([7])]],
  ).bytes;
