/**
 * Reads the tensors of a PyTorch checkpoint (`torch.save`): the zip format (PyTorch >= 1.6,
 * `PK\x03\x04`) and the legacy format written before it (a run of pickles starting with the
 * magic number, then the raw storages), told apart by the first bytes.
 *
 * The file is read by the bounded reader (a regular file of at most `MAX_CHECKPOINT_BYTES`). The
 * pickle is read by the allow-list unpickler (`data/torch_pickle.ts`): nothing in the file is
 * ever executed. The zip's directory is parsed and checked by `data/zip.ts`, and only the
 * entries needed (data.pkl, byteorder, the storages the tensors use) are inflated, each to its
 * declared size. Every storage is checked against the bytes really present, and every tensor
 * against its storage, before a value is allocated (data/torch_tensors.ts caps what a tensor that
 * repeats its storage may expand to). The work yields to the event loop as it goes, so Ctrl-C
 * ends a long load.
 *
 * The state dict is the top-level dict, or its `state_dict` / `model` entry (main_swav.py,
 * Lightning, torchvision references); its tensors come out as float32 (float64 / float16 /
 * bfloat16 converted) or, for integer tensors (`num_batches_tracked`), float64.
 */
import { Effect, Schema } from "effect";
import { readRegularFile } from "./bounded_read.ts";
import { reasonOf, shown } from "./errors.ts";
import {
  describe,
  InertGlobal,
  isTensorRef,
  MAX_PICKLE_BYTES,
  preview,
  type StorageRef,
  unpickleAt,
  Unusable,
} from "./torch_pickle.ts";
import { type ElementBudget, materialise, MAX_OVERLAP_ELEMENTS, type TorchTensor } from "./torch_tensors.ts";
import { entryBytes, Interrupted, type Pause, pauser, zipEntries } from "./zip.ts";

export type { TorchTensor } from "./torch_tensors.ts";

/** The largest checkpoint file read (4 GiB: a ResNet-50w5 with its head is about 2.4 GB). */
export const MAX_CHECKPOINT_BYTES = 4 * 2 ** 30;

/** A PyTorch checkpoint file that could not be read, and why. */
export class TorchCheckpointError extends Schema.TaggedError<TorchCheckpointError>()("TorchCheckpointError", {
  path: Schema.String,
  reason: Schema.String,
}) {
  /** The file and why it could not be read. */
  override get message(): string {
    return `PyTorch checkpoint ${shown(this.path, 200)}: ${shown(this.reason, 400)}`;
  }
}

export interface TorchStateDict {
  /** Which entry held the state dict: "" (the top level), "state_dict" or "model". */
  readonly entry: string;
  /** Tensors by their key, in the file's order. */
  readonly tensors: ReadonlyMap<string, TorchTensor>;
  /** Keys whose values are not tensors (kept out, listed for messages). */
  readonly skipped: readonly string[];
}

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

/**
 * The bytes of one storage, checked to hold `ref.numel` elements (a zip entry is checked against
 * its declared size before it is inflated); or why not.
 */
type StorageBytes = (ref: StorageRef) => Promise<Uint8Array | string>;

const u32 = (b: Uint8Array, o: number) =>
  (b[o]! | (b[o + 1]! << 8) | (b[o + 2]! << 16)) + b[o + 3]! * 2 ** 24;
const u64 = (b: Uint8Array, o: number) => u32(b, o) + u32(b, o + 4) * 2 ** 32;

const isZip = (b: Uint8Array) => b[0] === 0x50 && b[1] === 0x4b && b[2] === 0x03 && b[3] === 0x04;
const isPickle = (b: Uint8Array) => b[0] === 0x80 && b[1] !== undefined && b[1] >= 2 && b[1] <= 5;

/** Reads and parses `path`; see the module comment. */
export const readTorchStateDict = (path: string): Effect.Effect<TorchStateDict, TorchCheckpointError> =>
  Effect.gen(function* () {
    const bytes = yield* readRegularFile(path, MAX_CHECKPOINT_BYTES).pipe(
      Effect.mapError((error) =>
        new TorchCheckpointError({ path, reason: `cannot read the file: ${error.reason}` })
      ),
    );
    return yield* parseTorchStateDict(bytes, path);
  });

/**
 * The same on bytes in memory; `path` names them in errors. Interrupting the effect (Ctrl-C)
 * stops the parse at its next pause.
 */
export const parseTorchStateDict = (
  bytes: Uint8Array,
  path = "<bytes>",
): Effect.Effect<TorchStateDict, TorchCheckpointError> =>
  Effect.tryPromise({
    try: (signal) => parse(bytes, pauser(signal)),
    // Anything the parse throws comes from the file's content (a pickle that builds odd objects).
    catch: (error) => new TorchCheckpointError({ path, reason: `malformed checkpoint: ${reasonOf(error)}` }),
  }).pipe(
    Effect.flatMap((result) =>
      typeof result === "string"
        ? Effect.fail(new TorchCheckpointError({ path, reason: result }))
        : Effect.succeed(result)
    ),
  );

const parse = async (bytes: Uint8Array, pause: Pause): Promise<TorchStateDict | string> => {
  const parsed = isZip(bytes)
    ? await readZipContainer(bytes, pause)
    : isPickle(bytes)
    ? readLegacyContainer(bytes)
    : "neither a torch.save zip nor a legacy torch.save file (wrong first bytes)";
  if (typeof parsed === "string") return parsed;
  const { root, storage } = parsed;
  const found = findStateDict(root);
  if (typeof found === "string") return found;
  const tensors = new Map<string, TorchTensor>();
  const skipped: string[] = [];
  const refs: Array<[string, Parameters<typeof materialise>[0]]> = [];
  for (const [key, value] of found.dict) {
    if (typeof key !== "string") continue;
    if (value instanceof Unusable || value instanceof InertGlobal) {
      return `${shown(key, 80)}: ${describe(value)} where a tensor is needed`;
    }
    if (!isTensorRef(value)) skipped.push(key);
    else refs.push([key, value]);
  }
  // Every storage is checked against the file first (inflated once, each to its declared size), so
  // that the budget counts only elements really present: twice those, plus one overlap allowance.
  const stored = new Map<string, Uint8Array>();
  const verified = new Map<string, number>();
  for (const [key, ref] of refs) {
    const bytes = await storage(ref.storage);
    if (typeof bytes === "string") return `${shown(key, 80)}: ${bytes}`;
    stored.set(key, bytes);
    verified.set(ref.storage.key, Math.max(verified.get(ref.storage.key) ?? 0, ref.storage.numel));
  }
  const budget: ElementBudget = {
    left: 2 * [...verified.values()].reduce((a, b) => a + b, 0) + MAX_OVERLAP_ELEMENTS,
  };
  for (const [key, ref] of refs) {
    const tensor = await materialise(ref, stored.get(key)!, budget, pause);
    if (typeof tensor === "string") return `${shown(key, 80)}: ${tensor}`;
    tensors.set(key, tensor);
    await pause();
  }
  return { entry: found.entry, tensors, skipped };
};

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
    if (error instanceof Interrupted) throw error;
    return `malformed or truncated pickle: ${shown(reasonOf(error), 200)}`;
  }
};

// ---- zip format ------------------------------------------------------------------------------

/** The most bytes a zip checkpoint's entries may inflate to in all. */
const MAX_INFLATED_BYTES = MAX_CHECKPOINT_BYTES;

const readZipContainer = async (
  bytes: Uint8Array,
  pause: Pause,
): Promise<{ root: unknown; storage: StorageBytes } | string> => {
  const entries = zipEntries(bytes, MAX_INFLATED_BYTES);
  if (typeof entries === "string") return entries;
  const byName = new Map(entries.map((e) => [e.name, e]));
  const pkl = entries.find((e) => e.name === "data.pkl" || e.name.endsWith("/data.pkl"));
  if (pkl === undefined) return "a zip without data.pkl: not written by torch.save";
  if (pkl.originalSize > MAX_PICKLE_BYTES) {
    return `its data.pkl is ${pkl.originalSize} bytes, over the ${MAX_PICKLE_BYTES} this reader accepts`;
  }
  const prefix = pkl.name.slice(0, pkl.name.length - "data.pkl".length);
  const orderEntry = byName.get(`${prefix}byteorder`);
  if (orderEntry !== undefined) {
    if (orderEntry.originalSize > 16) return "a byteorder entry that is not little or big";
    const order = await entryBytes(bytes, orderEntry, pause);
    if (typeof order === "string") return order;
    if (new TextDecoder().decode(order).trim() !== "little") {
      return "a big-endian checkpoint (byteorder), not supported";
    }
  }
  const data = await entryBytes(bytes, pkl, pause);
  if (typeof data === "string") return data;
  const parsed = pickleStep(() => unpickleAt(data, 0));
  if (typeof parsed === "string") return parsed;
  const inflated = new Map<string, Uint8Array>();
  const storage: StorageBytes = async (ref) => {
    const entry = byName.get(`${prefix}data/${ref.key}`);
    if (entry === undefined) return `storage ${shown(ref.key, 40)} is not in the file`;
    const expected = ref.numel * ref.type.bytes;
    if (entry.originalSize !== expected) {
      return `storage ${shown(ref.key, 40)} claims ${ref.numel} ${ref.type.dtype} elements, ` +
        `the file holds ${entry.originalSize} bytes`;
    }
    const cached = inflated.get(entry.name);
    if (cached !== undefined) return cached;
    const got = await entryBytes(bytes, entry, pause);
    if (typeof got !== "string") inflated.set(entry.name, got);
    return got;
  };
  return { root: parsed.value, storage };
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
    if (protocol.value !== 1001) return `legacy protocol ${preview(protocol.value)}, not 1001`;
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
      const ref = typeof key === "string" ? storages.get(key) : undefined;
      if (ref === undefined) return `storage ${preview(key)} is listed but never used`;
      if (o + 8 > bytes.length) return `the file ends before storage ${ref.key}: truncated`;
      const numel = u64(bytes, o);
      const length = numel * ref.type.bytes;
      if (o + 8 + length > bytes.length) {
        return `storage ${ref.key} claims ${numel} elements, past the end of the file: truncated`;
      }
      found.set(ref.key, bytes.subarray(o + 8, o + 8 + length));
      o += 8 + length;
    }
    const storage: StorageBytes = (ref) => {
      const stored = found.get(ref.key);
      return Promise.resolve(
        stored === undefined
          ? `storage ${shown(ref.key, 40)} is not in the file`
          : stored.length !== ref.numel * ref.type.bytes
          ? `storage ${
            shown(ref.key, 40)
          } claims ${ref.numel} ${ref.type.dtype} elements, the file holds ${stored.length} bytes`
          : stored,
      );
    };
    return { root: root.value, storage };
  });
};
