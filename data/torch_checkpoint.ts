/**
 * Reads the tensors of a PyTorch checkpoint (`torch.save`): the zip format (PyTorch >= 1.6,
 * `PK\x03\x04`) and the legacy format written before it (a run of pickles starting with the
 * magic number, then the raw storages), told apart by the first bytes.
 *
 * The pickle is read by the allow-list unpickler (`data/torch_pickle.ts`): nothing in the file
 * is ever executed. The zip is extracted with `fflate`, after a bounds pass over its central
 * directory (`zipEntries`): fflate trusts the directory's counts, sizes and offsets (a zip64
 * count loops past the end, a claimed size is allocated as claimed). Every storage is checked
 * against the bytes really present, and every tensor against its storage, before a value is
 * allocated.
 *
 * The state dict is the top-level dict, or its `state_dict` / `model` entry (main_swav.py,
 * Lightning, torchvision references); its tensors come out as float32 (float64 / float16 /
 * bfloat16 converted) or, for integer tensors (`num_batches_tracked`), float64.
 */
import { Effect, Schema } from "effect";
import { unzipSync } from "fflate";
import { reasonOf } from "./errors.ts";
import {
  describe,
  InertGlobal,
  type StorageRef,
  type TensorRef,
  type TorchDType,
  unpickleAt,
  Unusable,
} from "./torch_pickle.ts";

export class TorchCheckpointError extends Schema.TaggedError<TorchCheckpointError>()("TorchCheckpointError", {
  path: Schema.String,
  reason: Schema.String,
}) {
  override get message(): string {
    return `PyTorch checkpoint ${this.path}: ${this.reason}`;
  }
}

/** One tensor of the state dict, row-major. */
export interface TorchTensor {
  readonly dtype: TorchDType;
  readonly shape: readonly number[];
  readonly values: Float32Array | Float64Array;
}

export interface TorchStateDict {
  /** Which entry held the state dict: "" (the top level), "state_dict" or "model". */
  readonly entry: string;
  /** Tensors by their key, in the file's order. */
  readonly tensors: ReadonlyMap<string, TorchTensor>;
  /** Keys whose values are not tensors (kept out, listed for messages). */
  readonly skipped: readonly string[];
}

/** The most elements one tensor may have (2^31, 8 GiB of float32: far above any ResNet weight). */
const MAX_ELEMENTS = 2 ** 31;
/** The legacy format's first pickle: PROTO 2, LONG1 0x1950a86a20f9469cfc6c, STOP (compared as bytes). */
const LEGACY_MAGIC = [
  0x80,
  0x02,
  0x8a,
  0x0a,
  0x6c,
  0xfc,
  0x9c,
  0x46,
  0xf9,
  0x20,
  0x6a,
  0xa8,
  0x50,
  0x19,
  0x2e,
];

/** Bytes of one storage, by key; undefined when the file has none under that key. */
type StorageBytes = (key: string) => Uint8Array | undefined;

const isZip = (b: Uint8Array) => b[0] === 0x50 && b[1] === 0x4b && b[2] === 0x03 && b[3] === 0x04;
const isPickle = (b: Uint8Array) => b[0] === 0x80 && b[1] !== undefined && b[1] >= 2 && b[1] <= 5;

/** Reads and parses `path`; see the module comment. */
export const readTorchStateDict = (path: string): Effect.Effect<TorchStateDict, TorchCheckpointError> =>
  Effect.gen(function* () {
    const bytes = yield* Effect.tryPromise({
      try: () => Deno.readFile(path),
      catch: (error) =>
        new TorchCheckpointError({ path, reason: `cannot read the file: ${reasonOf(error)}` }),
    });
    return yield* parseTorchStateDict(bytes, path);
  });

/** The same on bytes in memory; `path` names them in errors. */
export const parseTorchStateDict = (
  bytes: Uint8Array,
  path = "<bytes>",
): Effect.Effect<TorchStateDict, TorchCheckpointError> =>
  Effect.gen(function* () {
    const fail = (reason: string) => Effect.fail(new TorchCheckpointError({ path, reason }));
    const parsed = isZip(bytes)
      ? readZipContainer(bytes)
      : isPickle(bytes)
      ? readLegacyContainer(bytes)
      : "neither a torch.save zip nor a legacy torch.save file (wrong first bytes)";
    if (typeof parsed === "string") return yield* fail(parsed);
    const { root, storage } = parsed;
    const found = findStateDict(root);
    if (typeof found === "string") return yield* fail(found);
    const tensors = new Map<string, TorchTensor>();
    const skipped: string[] = [];
    for (const [key, value] of found.dict) {
      if (typeof key !== "string") continue;
      if (value instanceof Unusable || value instanceof InertGlobal) {
        return yield* fail(`${key}: ${describe(value)} where a tensor is needed`);
      }
      if (!isTensorRef(value)) {
        skipped.push(key);
        continue;
      }
      const tensor = materialise(value, storage);
      if (typeof tensor === "string") return yield* fail(`${key}: ${tensor}`);
      tensors.set(key, tensor);
    }
    return { entry: found.entry, tensors, skipped };
  });

const isTensorRef = (v: unknown): v is TensorRef =>
  typeof v === "object" && v !== null && (v as TensorRef).kind === "tensor";

const findStateDict = (root: unknown): { entry: string; dict: Map<unknown, unknown> } | string => {
  if (!(root instanceof Map)) return `the file holds ${describe(root)}, not a dict of tensors`;
  for (const entry of ["state_dict", "model"]) {
    const inner = root.get(entry);
    if (inner instanceof Map) return { entry, dict: inner };
    if (inner instanceof InertGlobal || inner instanceof Unusable) {
      return `its "${entry}" is ${describe(inner)}, not a state dict`;
    }
  }
  return { entry: "", dict: root };
};

const pickleStep = <T>(run: () => T): T | string => {
  try {
    return run();
  } catch (error) {
    // pickleparser's reader throws on a truncated or malformed stream; it is a data error here.
    return `malformed or truncated pickle: ${reasonOf(error)}`;
  }
};

// ---- zip format ------------------------------------------------------------------------------

interface ZipEntry {
  readonly name: string;
  readonly compression: number;
  readonly size: number;
  readonly originalSize: number;
}

const u16 = (b: Uint8Array, o: number) => b[o]! | (b[o + 1]! << 8);
const u32 = (b: Uint8Array, o: number) =>
  (b[o]! | (b[o + 1]! << 8) | (b[o + 2]! << 16)) + b[o + 3]! * 2 ** 24;
const u64 = (b: Uint8Array, o: number) => u32(b, o) + u32(b, o + 4) * 2 ** 32;

/**
 * Walks the central directory with every offset and size checked against the file, so that
 * fflate only ever sees a directory that stays inside it. Returns the entries, or a reason.
 */
export const zipEntries = (b: Uint8Array): ZipEntry[] | string => {
  const n = b.length;
  let eocd = -1;
  for (let o = n - 22; o >= 0 && o >= n - 22 - 0xffff; o--) {
    if (u32(b, o) === 0x06054b50) {
      eocd = o;
      break;
    }
  }
  if (eocd < 0) return "no zip end-of-directory record: a truncated file?";
  let count = u16(b, eocd + 10);
  let cdSize = u32(b, eocd + 12);
  let cdOffset = u32(b, eocd + 16);
  const zip64 = count === 0xffff || cdSize === 0xffffffff || cdOffset === 0xffffffff;
  let cdEnd = eocd;
  if (zip64) {
    const locator = eocd - 20;
    if (locator < 0 || u32(b, locator) !== 0x07064b50) return "a zip64 directory without its locator";
    const record = u64(b, locator + 8);
    if (record + 56 > locator || u32(b, record) !== 0x06064b50) return "a zip64 record outside the file";
    count = u64(b, record + 32);
    cdSize = u64(b, record + 40);
    cdOffset = u64(b, record + 48);
    cdEnd = record;
  }
  if (cdOffset + cdSize > cdEnd) return "the zip directory points outside the file";
  if (count * 46 > cdSize) return `the zip directory claims ${count} entries in ${cdSize} bytes`;
  const entries: ZipEntry[] = [];
  let o = cdOffset;
  for (let i = 0; i < count; i++) {
    if (o + 46 > cdOffset + cdSize || u32(b, o) !== 0x02014b50) {
      return "a zip directory entry outside the directory";
    }
    const compression = u16(b, o + 10);
    let size = u32(b, o + 20);
    let originalSize = u32(b, o + 24);
    const nameLength = u16(b, o + 28);
    const extraLength = u16(b, o + 30);
    const commentLength = u16(b, o + 32);
    let local = u32(b, o + 42);
    const next = o + 46 + nameLength + extraLength + commentLength;
    if (next > cdOffset + cdSize) return "a zip directory entry outside the directory";
    const name = new TextDecoder().decode(b.subarray(o + 46, o + 46 + nameLength));
    if (size === 0xffffffff || originalSize === 0xffffffff || local === 0xffffffff) {
      // The zip64 extra field (id 1) holds, in order, the sizes and offset that overflowed.
      let e = o + 46 + nameLength;
      const extraEnd = e + extraLength;
      let found = false;
      while (e + 4 <= extraEnd) {
        const id = u16(b, e);
        const length = u16(b, e + 2);
        if (e + 4 + length > extraEnd) break;
        if (id === 1) {
          let f = e + 4;
          const take = () => {
            const v = f + 8 <= e + 4 + length ? u64(b, f) : Number.NaN;
            f += 8;
            return v;
          };
          if (originalSize === 0xffffffff) originalSize = take();
          if (size === 0xffffffff) size = take();
          if (local === 0xffffffff) local = take();
          found = true;
          break;
        }
        e += 4 + length;
      }
      if (!found || [size, originalSize, local].some(Number.isNaN)) {
        return `zip entry ${name}: a bad zip64 field`;
      }
    }
    if (name.startsWith("/") || name.split(/[\\/]/).includes("..")) {
      return `zip entry ${JSON.stringify(name)} points outside the archive`;
    }
    if (local + 30 > cdOffset || u32(b, local) !== 0x04034b50) {
      return `zip entry ${name} points outside the file (offset ${local})`;
    }
    const dataStart = local + 30 + u16(b, local + 26) + u16(b, local + 28);
    if (dataStart + size > cdOffset) {
      return `zip entry ${name} points outside the file (${size} bytes at ${dataStart})`;
    }
    if (compression === 0 && originalSize !== size) return `zip entry ${name}: stored sizes differ`;
    // Deflate expands at most ~1032x: a larger claim is a lie, and fflate would allocate it.
    if (compression === 8 && (originalSize > MAX_ELEMENTS * 8 || originalSize > size * 1032 + 64)) {
      return `zip entry ${name} claims ${originalSize} bytes from ${size}`;
    }
    if (compression !== 0 && compression !== 8) return `zip entry ${name}: compression method ${compression}`;
    entries.push({ name, compression, size, originalSize });
    o = next;
  }
  return entries;
};

const readZipContainer = (bytes: Uint8Array): { root: unknown; storage: StorageBytes } | string => {
  const entries = zipEntries(bytes);
  if (typeof entries === "string") return entries;
  const pkl = entries.find((e) => e.name === "data.pkl" || e.name.endsWith("/data.pkl"));
  if (pkl === undefined) return "a zip without data.pkl: not written by torch.save";
  const prefix = pkl.name.slice(0, pkl.name.length - "data.pkl".length);
  const files = pickleStep(() => unzipSync(bytes));
  if (typeof files === "string") return `cannot unzip: ${files}`;
  const order = files[`${prefix}byteorder`];
  if (order !== undefined && new TextDecoder().decode(order).trim() !== "little") {
    return "a big-endian checkpoint (byteorder), not supported";
  }
  const data = files[pkl.name]!;
  const parsed = pickleStep(() => unpickleAt(data, 0));
  if (typeof parsed === "string") return parsed;
  return { root: parsed.value, storage: (key) => files[`${prefix}data/${key}`] };
};

// ---- legacy format ---------------------------------------------------------------------------

/**
 * magic number, protocol version, sys info, the object, the storage keys, then per key an
 * int64 element count and the storage's raw bytes (torch/serialization.py, `_legacy_save`).
 */
const readLegacyContainer = (bytes: Uint8Array): { root: unknown; storage: StorageBytes } | string => {
  const storages = new Map<string, StorageRef>();
  return pickleStep(() => {
    if (LEGACY_MAGIC.some((v, i) => bytes[i] !== v)) {
      return "a pickle, but not a torch.save file (no magic number)";
    }
    const protocol = unpickleAt(bytes, LEGACY_MAGIC.length);
    if (protocol.value !== 1001) return `legacy protocol ${String(protocol.value)}, not 1001`;
    const info = unpickleAt(bytes, protocol.end);
    if (info.value instanceof Map && info.value.get("little_endian") === false) {
      return "a big-endian checkpoint, not supported";
    }
    const root = unpickleAt(bytes, info.end, (ref) => storages.set(ref.key, ref));
    const keys = unpickleAt(bytes, root.end);
    if (!Array.isArray(keys.value)) return "the legacy storage list is missing";
    const found = new Map<string, Uint8Array>();
    let o = keys.end;
    for (const key of keys.value) {
      const ref = storages.get(String(key));
      if (ref === undefined) return `storage ${String(key)} is listed but never used`;
      if (o + 8 > bytes.length) return `the file ends before storage ${ref.key}: truncated`;
      const numel = u64(bytes, o);
      const length = numel * ref.type.bytes;
      if (o + 8 + length > bytes.length) {
        return `storage ${ref.key} claims ${numel} elements, past the end of the file: truncated`;
      }
      found.set(ref.key, bytes.subarray(o + 8, o + 8 + length));
      o += 8 + length;
    }
    return { root: root.value, storage: (key: string) => found.get(key) };
  });
};

// ---- tensors -------------------------------------------------------------------------------

const halfToFloat = (h: number): number => {
  const sign = h & 0x8000 ? -1 : 1;
  const exponent = (h >> 10) & 0x1f;
  const fraction = h & 0x3ff;
  if (exponent === 0) return sign * fraction * 2 ** -24;
  if (exponent === 31) return fraction ? Number.NaN : sign * Infinity;
  return sign * (1 + fraction / 1024) * 2 ** (exponent - 15);
};

/** Element `i` of a storage's bytes as a number (little-endian). */
const elementReader = (dtype: TorchDType, bytes: Uint8Array): (i: number) => number => {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  switch (dtype) {
    case "float32":
      return (i) => view.getFloat32(4 * i, true);
    case "float64":
      return (i) => view.getFloat64(8 * i, true);
    case "float16":
      return (i) => halfToFloat(view.getUint16(2 * i, true));
    case "bfloat16":
      return (i) => {
        const scratch = new DataView(new ArrayBuffer(4));
        scratch.setUint32(0, view.getUint16(2 * i, true) << 16);
        return scratch.getFloat32(0);
      };
    case "int64":
      return (i) => Number(view.getBigInt64(8 * i, true));
    case "int32":
      return (i) => view.getInt32(4 * i, true);
    case "int16":
      return (i) => view.getInt16(2 * i, true);
    case "int8":
      return (i) => view.getInt8(i);
    case "uint8":
    case "bool":
      return (i) => view.getUint8(i);
  }
};

/** The tensor's values, after checking its storage against the file and its extent against the storage. */
const materialise = (ref: TensorRef, storage: StorageBytes): TorchTensor | string => {
  const { type, key, numel } = ref.storage;
  const bytes = storage(key);
  if (bytes === undefined) return `storage ${key} is not in the file`;
  if (numel * type.bytes !== bytes.length) {
    return `storage ${key} claims ${numel} ${type.dtype} elements, the file holds ${bytes.length} bytes`;
  }
  let count = 1;
  let last = ref.offset;
  for (let d = 0; d < ref.shape.length; d++) {
    count *= ref.shape[d]!;
    if (ref.shape[d]! > 0) last += (ref.shape[d]! - 1) * ref.stride[d]!;
  }
  if (count > MAX_ELEMENTS) return `a tensor of shape [${ref.shape}] is larger than this reader accepts`;
  if (count > 0 && last >= numel) {
    return `shape [${ref.shape}] at offset ${ref.offset} runs past its storage of ${numel} elements`;
  }
  const floating = type.dtype.startsWith("float") || type.dtype === "bfloat16";
  const values = floating ? new Float32Array(count) : new Float64Array(count);
  const read = elementReader(type.dtype, bytes);
  // Row-major walk with torch's strides (contiguous tensors are the common case of it).
  const index = new Array<number>(ref.shape.length).fill(0);
  let position = ref.offset;
  for (let i = 0; i < count; i++) {
    values[i] = read(position);
    for (let d = ref.shape.length - 1; d >= 0; d--) {
      index[d]!++;
      position += ref.stride[d]!;
      if (index[d]! < ref.shape[d]!) break;
      position -= ref.stride[d]! * ref.shape[d]!;
      index[d] = 0;
    }
  }
  return { dtype: type.dtype, shape: ref.shape, values };
};
