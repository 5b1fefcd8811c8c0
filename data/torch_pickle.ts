/**
 * The allow-list unpickler for PyTorch checkpoints, over `pickleparser`'s opcode reader.
 *
 * A pickle names Python callables (GLOBAL / STACK_GLOBAL) that the unpickler calls with
 * arguments from the stream: that is how a pickle runs code. Here no pickled name is ever
 * resolved to anything but our own data constructors: the allow-list below (OrderedDict,
 * tensor and parameter rebuilds, storage types) maps to functions that only build records,
 * and every other name (`os.system`, a Lightning hyper-parameter class) becomes an
 * `InertGlobal` whose "call" records its name and arguments and does nothing else.
 * Dictionaries are `Map`s (no key can reach an object prototype).
 *
 * Tensors are not materialised here: a rebuild returns a `TensorRef` (storage, offset,
 * shape, stride), checked later against the bytes that really are in the file. Bad
 * references become inert `Unusable` values rather than exceptions, so a failure is a
 * typed error where a tensor is needed, and nothing where it is not.
 */
import { BufferReader, Parser } from "pickleparser";
import { shown } from "./errors.ts";

/** A torch storage type (`torch.FloatStorage`, ...): element type and size in bytes. */
export interface StorageType {
  readonly kind: "storageType";
  readonly dtype: TorchDType;
  readonly bytes: number;
}

export type TorchDType =
  | "float32"
  | "float64"
  | "float16"
  | "bfloat16"
  | "int64"
  | "int32"
  | "int16"
  | "int8"
  | "uint8"
  | "bool";

const STORAGE_TYPES: Record<string, readonly [TorchDType, number]> = {
  FloatStorage: ["float32", 4],
  DoubleStorage: ["float64", 8],
  HalfStorage: ["float16", 2],
  BFloat16Storage: ["bfloat16", 2],
  LongStorage: ["int64", 8],
  IntStorage: ["int32", 4],
  ShortStorage: ["int16", 2],
  CharStorage: ["int8", 1],
  ByteStorage: ["uint8", 1],
  BoolStorage: ["bool", 1],
};

/** A storage named by `persistent_load`: its bytes are found later by `key`. */
export interface StorageRef {
  readonly kind: "storage";
  readonly type: StorageType;
  readonly key: string;
  /** Elements the file claims the storage holds (checked against its bytes before use). */
  readonly numel: number;
}

/** `_rebuild_tensor_v2`'s arguments, unchecked. */
export interface TensorRef {
  readonly kind: "tensor";
  readonly storage: StorageRef;
  readonly offset: number;
  readonly shape: readonly number[];
  readonly stride: readonly number[];
}

/** A value that cannot be used as what it claims to be (a bad reference), with the reason. */
export class Unusable {
  constructor(readonly reason: string) {}
}

/** What a name outside the allow-list becomes: its "calls" and "builds" are recorded, never run. */
export class InertGlobal {
  state: unknown = undefined;
  constructor(readonly module: string, readonly name: string, readonly args: readonly unknown[]) {}
  __setstate__(state: unknown): void {
    this.state = state;
  }
  toString(): string {
    return `${this.module}.${this.name}`;
  }
}

/**
 * The records this module made. A pickle's BUILD can copy any attributes onto a list or other
 * object, so a record is recognised by this brand, never by its fields; records are frozen so that
 * BUILD cannot change them either (it then throws, a malformed-pickle error).
 */
const genuine = new WeakSet<object>();
const record = <T extends object>(value: T): T => {
  genuine.add(value);
  return Object.freeze(value);
};
const STORAGE_TYPE_RECORDS = new Map(
  Object.entries(STORAGE_TYPES).map((
    [name, [dtype, bytes]],
  ) => [name, record<StorageType>({ kind: "storageType", dtype, bytes })]),
);

export const isStorageType = (v: unknown): v is StorageType =>
  typeof v === "object" && v !== null && genuine.has(v) && (v as StorageType).kind === "storageType";
export const isStorageRef = (v: unknown): v is StorageRef =>
  typeof v === "object" && v !== null && genuine.has(v) && (v as StorageRef).kind === "storage";
export const isTensorRef = (v: unknown): v is TensorRef =>
  typeof v === "object" && v !== null && genuine.has(v) && (v as TensorRef).kind === "tensor";

const isIndex = (v: unknown): v is number => typeof v === "number" && Number.isSafeInteger(v) && v >= 0;
/** LONG1 values past 2^53 arrive as bigint: kept as a number only where exact. */
const asIndex = (v: unknown): number | undefined =>
  isIndex(v)
    ? v
    : typeof v === "bigint" && v >= 0n && v <= BigInt(Number.MAX_SAFE_INTEGER)
    ? Number(v)
    : undefined;
const indexList = (v: unknown): number[] | undefined => {
  if (!Array.isArray(v)) return undefined;
  const out: number[] = [];
  for (const x of v) {
    const i = asIndex(x);
    if (i === undefined) return undefined;
    out.push(i);
  }
  return out;
};

const rebuildTensor = (
  storage: unknown,
  offset: unknown,
  size: unknown,
  stride: unknown,
): TensorRef | Unusable => {
  if (storage instanceof Unusable) return storage;
  if (!isStorageRef(storage)) {
    return new Unusable(`a tensor's storage is ${describe(storage)}, not a torch storage`);
  }
  const shape = indexList(size);
  const strides = indexList(stride);
  const start = asIndex(offset);
  if (
    shape === undefined || strides === undefined || start === undefined || shape.length !== strides.length
  ) {
    return new Unusable(`a tensor has a malformed shape ${preview(size)} / stride ${preview(stride)}`);
  }
  return record({
    kind: "tensor" as const,
    storage,
    offset: start,
    shape: Object.freeze(shape),
    stride: Object.freeze(strides),
  });
};

// A function (not a class) so that both REDUCE (a call) and NEWOBJ (a construct) get the record.
const inert = (module: string, name: string) =>
  function (...args: unknown[]) {
    return new InertGlobal(module, name, args);
  };

const ALLOWED: Record<string, (...args: unknown[]) => unknown> = {
  "collections.OrderedDict": () => new Map(),
  "torch._utils._rebuild_tensor_v2": (storage, offset, size, stride) =>
    rebuildTensor(storage, offset, size, stride),
  "torch._utils._rebuild_tensor": (storage, offset, size, stride) =>
    rebuildTensor(storage, offset, size, stride),
  "torch._utils._rebuild_parameter": (data) => data,
  "torch._utils._rebuild_parameter_with_state": (data) => data,
};

/** The value a pickled name resolves to: an allow-listed record builder, a storage type, or an inert global. */
const resolveName = (module: unknown, name: unknown): unknown => {
  // STACK_GLOBAL takes its names from the stack: anything but two strings names nothing.
  if (typeof module !== "string" || typeof name !== "string") {
    return new Unusable(`a global named by ${preview(module)} and ${preview(name)}, not by strings`);
  }
  const qualified = `${module}.${name}`;
  const allowed = ALLOWED[qualified];
  if (allowed !== undefined) return allowed;
  const storage = module === "torch" ? STORAGE_TYPES[name] : undefined;
  if (storage !== undefined) {
    return STORAGE_TYPE_RECORDS.get(name);
  }
  return inert(module, name);
};

/**
 * torch's `persistent_load`: ('storage', type, key, location, numel[, view metadata]) names a
 * storage. `onStorage` records it (so the legacy reader knows each key's element size).
 */
const persistentLoad = (onStorage: (ref: StorageRef) => void) => (pid: unknown): StorageRef | Unusable => {
  if (!Array.isArray(pid) || pid[0] !== "storage" || pid.length < 5) {
    return new Unusable(`an unknown persistent id ${describe(pid)}`);
  }
  const [, type, key, , numel, view] = pid;
  if (!isStorageType(type)) {
    return new Unusable(`a storage of type ${describe(type)}, not a known torch storage type`);
  }
  const count = asIndex(numel);
  if (typeof key !== "string" || count === undefined) return new Unusable("a malformed storage reference");
  if (view !== undefined && view !== null) {
    return new Unusable("a storage view (legacy format), not supported");
  }
  const ref = record<StorageRef>({ kind: "storage", type, key, numel: count });
  onStorage(ref);
  return ref;
};

/**
 * A short, bounded rendering of a pickled value for messages: at most 6 items per list and 3
 * levels deep, strings cut (a list shared many times over would otherwise expand without end).
 */
export const preview = (v: unknown, depth = 3): string => {
  if (typeof v === "string") return JSON.stringify(shown(v, 40));
  if (typeof v === "number" || typeof v === "bigint" || typeof v === "boolean") return shown(String(v), 40);
  if (v === null || v === undefined) return "None";
  if (Array.isArray(v)) {
    if (depth === 0) return "[…]";
    const items = Array.from({ length: Math.min(v.length, 6) }, (_, i) => preview(v[i], depth - 1));
    return `[${items.join(", ")}${v.length > 6 ? `, … ${v.length} items` : ""}]`;
  }
  return describe(v);
};

export const describe = (v: unknown): string =>
  v instanceof InertGlobal
    ? `the Python object ${shown(`${v}`, 80)} (not resolved: only tensors are read)`
    : v instanceof Unusable
    ? v.reason
    : v === null
    ? "None"
    : Array.isArray(v)
    ? "a list"
    : v instanceof Map
    ? "a dict"
    : typeof v;

/**
 * pickleparser's reader with two of its integer reads bounded: a LONG4 integer (opcode 0x8b, whose
 * length comes from `uint32` right after the opcode) longer than 8 bytes is refused (its decoder
 * is quadratic in the length, and no checkpoint index needs more than 8 bytes), and a 64-bit
 * length past 2^53 is an error rather than a warning printed on stdout.
 */
class CheckedReader extends BufferReader {
  readonly #bytes: Uint8Array;
  constructor(bytes: Uint8Array) {
    super(bytes);
    this.#bytes = bytes;
  }
  override uint32(): number {
    const opcode = this.#bytes[this.position - 1];
    const value = super.uint32();
    if (opcode === 0x8b && value > 8) {
      throw new Error(`a LONG4 integer of ${value} bytes (a checkpoint's integers fit in 8)`);
    }
    return value;
  }
  override uint64(): number {
    const lo = super.uint32();
    const hi = super.uint32();
    const value = lo + hi * 2 ** 32;
    if (!Number.isSafeInteger(value)) throw new Error("a 64-bit length past 2^53");
    return value;
  }
}

/** The most bytes one pickle may span (a ResNet-50 state dict's data.pkl is ~30 KB). */
export const MAX_PICKLE_BYTES = 64 * 2 ** 20;

/**
 * Unpickles one pickle of `bytes` starting at `start`; returns the value and the position after
 * its STOP. The pickle may span at most `MAX_PICKLE_BYTES` (past that it reads as truncated), so
 * its parse time is bounded. Throws what the opcode reader throws on a malformed or truncated
 * stream: the callers turn it into a typed error.
 */
export const unpickleAt = (
  bytes: Uint8Array,
  start: number,
  onStorage: (ref: StorageRef) => void = () => {},
): { value: unknown; end: number } => {
  const parser = new Parser({
    nameResolver: {
      resolve: (module: unknown, name: unknown) =>
        resolveName(module, name) as (...args: unknown[]) => unknown,
    },
    persistentResolver: { resolve: persistentLoad(onStorage) },
    extensionResolver: { resolve: (code) => new Unusable(`an extension code ${code}`) },
    unpicklingTypeOfDictionary: "Map",
    unpicklingTypeOfSet: "array",
  });
  const reader = new CheckedReader(bytes.subarray(0, Math.min(bytes.length, start + MAX_PICKLE_BYTES)));
  reader.skip(start);
  const value = parser.read(reader);
  return { value, end: reader.position };
};
