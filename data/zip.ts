/**
 * A checked reader for untrusted zip files (a PyTorch `.pth` is one): our own parser of the
 * end-of-directory records and the central directory, and a bounded inflate of one entry.
 *
 * Nothing here trusts a count, size or offset the file states: the zip64 records must agree with
 * the classic end record, the entry count must fit the directory's bytes, every local header must
 * lie inside the file and agree with its directory entry, entries may not overlap (one deflated
 * entry named 32 times would otherwise inflate 32 times), and an entry inflates to at most its
 * declared size (inflating stops past it). fflate is used only for the raw inflate of an entry that
 * passed these checks, fed in small pieces so that one piece expands to at most ~17 MB and a long
 * inflate yields to the event loop (Ctrl-C stays responsive).
 */
import { Inflate } from "fflate";
import { reasonOf, shown } from "./errors.ts";

export interface ZipEntry {
  readonly name: string;
  /** 0 stored, 8 deflated. */
  readonly compression: number;
  /** Bytes in the file. */
  readonly size: number;
  /** Bytes once inflated, as declared (and enforced). */
  readonly originalSize: number;
  /** Where the entry's bytes start in the file. */
  readonly dataStart: number;
}

/** Deflate's best ratio is about 1032:1; a larger claim is a lie. */
const MAX_DEFLATE_RATIO = 1032;

const u16 = (b: Uint8Array, o: number) => b[o]! | (b[o + 1]! << 8);
const u32 = (b: Uint8Array, o: number) =>
  (b[o]! | (b[o + 1]! << 8) | (b[o + 2]! << 16)) + b[o + 3]! * 2 ** 24;
const u64 = (b: Uint8Array, o: number) => u32(b, o) + u32(b, o + 4) * 2 ** 32;

const EOCD = 0x06054b50;
const ZIP64_LOCATOR = 0x07064b50;
const ZIP64_RECORD = 0x06064b50;
const CENTRAL = 0x02014b50;
const LOCAL = 0x04034b50;

interface Directory {
  readonly count: number;
  readonly size: number;
  readonly offset: number;
  /** Where the directory must end: the zip64 record, or the end record. */
  readonly end: number;
}

/** The end records, checked against each other and the file; a reason when they do not hold. */
const directory = (b: Uint8Array): Directory | string => {
  const n = b.length;
  let eocd = -1;
  for (let o = n - 22; o >= 0 && o >= n - 22 - 0xffff; o--) {
    if (u32(b, o) === EOCD && o + 22 + u16(b, o + 20) === n) {
      eocd = o;
      break;
    }
  }
  if (eocd < 0) return "no zip end-of-directory record: a truncated file?";
  const disk = u16(b, eocd + 4), cdDisk = u16(b, eocd + 6);
  const onDisk = u16(b, eocd + 8), total = u16(b, eocd + 10);
  const size = u32(b, eocd + 12), offset = u32(b, eocd + 16);
  if (offset !== 0xffffffff && size !== 0xffffffff && offset + size > eocd) {
    return "the zip directory points outside the file";
  }
  const locator = eocd - 20;
  const hasLocator = locator >= 0 && u32(b, locator) === ZIP64_LOCATOR;
  const saturated = onDisk === 0xffff || total === 0xffff || size === 0xffffffff || offset === 0xffffffff;
  if (!hasLocator) {
    if (saturated) return "a zip64 directory without its locator";
    if (disk !== 0 || cdDisk !== 0 || onDisk !== total) return "a multi-disk zip, not supported";
    return { count: total, size, offset, end: eocd };
  }
  // The locator names the zip64 record, which must end where the locator starts.
  const record = u64(b, locator + 8);
  if (u32(b, locator + 4) !== 0 || u32(b, locator + 16) !== 1) return "a multi-disk zip64, not supported";
  if (record + 56 > locator || u32(b, record) !== ZIP64_RECORD) return "a zip64 record outside the file";
  if (record + 12 + u64(b, record + 4) !== locator) {
    return "a zip64 record whose length disagrees with the file";
  }
  const z = {
    disk: u32(b, record + 16),
    cdDisk: u32(b, record + 20),
    onDisk: u64(b, record + 24),
    total: u64(b, record + 32),
    size: u64(b, record + 40),
    offset: u64(b, record + 48),
  };
  if (z.disk !== 0 || z.cdDisk !== 0 || z.onDisk !== z.total) return "a multi-disk zip64, not supported";
  // Every classic field is either saturated (the zip64 one holds it) or equal to the zip64 one.
  const agree = (classic: number, max: number, wide: number) => classic === max || classic === wide;
  if (
    !agree(onDisk, 0xffff, z.onDisk) || !agree(total, 0xffff, z.total) ||
    !agree(size, 0xffffffff, z.size) || !agree(offset, 0xffffffff, z.offset) || onDisk !== total
  ) {
    return "the zip's end record and zip64 record disagree (entry count, directory size or offset)";
  }
  return { count: z.total, size: z.size, offset: z.offset, end: record };
};

/**
 * The entries of the zip in `b`, every one checked (see the module comment), in directory order;
 * or a reason, for the user, why the file is refused. `maxTotal` caps the sum of the declared
 * inflated sizes.
 */
export const zipEntries = (b: Uint8Array, maxTotal: number): ZipEntry[] | string => {
  const dir = directory(b);
  if (typeof dir === "string") return dir;
  if (dir.offset + dir.size > dir.end) return "the zip directory points outside the file";
  if (dir.count * 46 > dir.size) return `the zip directory claims ${dir.count} entries in ${dir.size} bytes`;
  const entries: ZipEntry[] = [];
  const spans: Array<[number, number, string]> = [];
  const names = new Set<string>();
  const starts = new Set<number>();
  const cdEnd = dir.offset + dir.size;
  let total = 0;
  let o = dir.offset;
  for (let i = 0; i < dir.count; i++) {
    if (o + 46 > cdEnd || u32(b, o) !== CENTRAL) return "a zip directory entry outside the directory";
    const flags = u16(b, o + 8);
    const compression = u16(b, o + 10);
    let size = u32(b, o + 20);
    let originalSize = u32(b, o + 24);
    const nameLength = u16(b, o + 28);
    const extraLength = u16(b, o + 30);
    const commentLength = u16(b, o + 32);
    let local = u32(b, o + 42);
    const next = o + 46 + nameLength + extraLength + commentLength;
    if (next > cdEnd) return "a zip directory entry outside the directory";
    const nameBytes = b.subarray(o + 46, o + 46 + nameLength);
    const name = new TextDecoder().decode(nameBytes);
    const label = `zip entry ${shown(JSON.stringify(name), 100)}`;
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
      if (!found || [size, originalSize, local].some(Number.isNaN)) return `${label}: a bad zip64 field`;
    }
    if (name.startsWith("/") || name.split(/[\\/]/).includes("..")) {
      return `${label} points outside the archive`;
    }
    if (names.has(name)) return `${label} appears twice`;
    names.add(name);
    if (flags & 1) return `${label} is encrypted`;
    if (compression !== 0 && compression !== 8) return `${label}: compression method ${compression}`;
    if (compression === 0 && originalSize !== size) return `${label}: stored sizes differ`;
    if (compression === 8 && originalSize > size * MAX_DEFLATE_RATIO + 64) {
      return `${label} claims ${originalSize} bytes from ${size}`;
    }
    total += originalSize;
    if (total > maxTotal) {
      return `the zip's entries claim over ${maxTotal} bytes in all, more than this reader accepts`;
    }
    if (starts.has(local)) return `${label} shares its bytes with another entry`;
    starts.add(local);
    // The local header: inside the file, before the directory, the same name, the same sizes.
    if (local + 30 > dir.offset || u32(b, local) !== LOCAL) {
      return `${label} points outside the file (offset ${local})`;
    }
    const localNameLength = u16(b, local + 26);
    const dataStart = local + 30 + localNameLength + u16(b, local + 28);
    if (dataStart + size > dir.offset) {
      return `${label} points outside the file (${size} bytes at ${dataStart})`;
    }
    const sameName = localNameLength === nameLength &&
      b.subarray(local + 30, local + 30 + nameLength).every((c, k) => c === nameBytes[k]);
    if (!sameName || u16(b, local + 8) !== compression) {
      return `${label}: its local header names another entry or method`;
    }
    const localSize = u32(b, local + 18), localOriginal = u32(b, local + 22);
    // With a data descriptor (flag bit 3, as torch.save writes) the local sizes are 0; otherwise
    // they must be the directory's (or saturated, for zip64).
    const fits = (l: number, c: number) => l === c || l === 0xffffffff || ((flags & 8) !== 0 && l === 0);
    if (!fits(localSize, size) || !fits(localOriginal, originalSize)) {
      return `${label}: its sizes differ between the local header and the directory`;
    }
    spans.push([local, dataStart + size, label]);
    entries.push({ name, compression, size, originalSize, dataStart });
    o = next;
  }
  spans.sort((x, y) => x[0] - y[0]);
  for (let k = 1; k < spans.length; k++) {
    if (spans[k]![0] < spans[k - 1]![1]) return `${spans[k]![2]} overlaps ${spans[k - 1]![2]}`;
  }
  return entries;
};

/** Thrown by a `Pause` once its signal is aborted (the effect running the work was interrupted). */
export class Interrupted extends Error {
  constructor() {
    super("interrupted");
  }
}

/** Awaited between pieces of long work: lets signal handlers run, and throws once `signal` is aborted. */
export type Pause = () => Promise<void>;

/** A `Pause` that yields to the event loop every ~50 ms of work and stops when `signal` aborts. */
export const pauser = (signal?: AbortSignal): Pause => {
  let last = performance.now();
  return async () => {
    if (performance.now() - last < 50) return;
    await new Promise((resolve) => setTimeout(resolve, 0));
    if (signal?.aborted) throw new Interrupted();
    last = performance.now();
  };
};

/** Compressed bytes fed to the inflater at a time: each piece expands to at most ~17 MB. */
const PIECE = 16 * 1024;

/**
 * The bytes of a checked entry, inflated to exactly its declared size: the inflate stops as soon
 * as it passes that size, and a stream that ends short is refused. A reason when it fails.
 */
export const entryBytes = async (
  b: Uint8Array,
  entry: ZipEntry,
  pause: Pause,
): Promise<Uint8Array | string> => {
  const raw = b.subarray(entry.dataStart, entry.dataStart + entry.size);
  if (entry.compression === 0) return raw;
  const label = `zip entry ${shown(JSON.stringify(entry.name), 100)}`;
  const out = new Uint8Array(entry.originalSize);
  let at = 0;
  let over = false;
  let ended = false;
  const inflater = new Inflate((chunk, final) => {
    if (at + chunk.length > out.length) over = true;
    else out.set(chunk, at);
    at += chunk.length;
    if (final) ended = true;
  });
  try {
    for (let p = 0; p < raw.length && !over && !ended; p += PIECE) {
      inflater.push(raw.subarray(p, Math.min(p + PIECE, raw.length)), p + PIECE >= raw.length);
      await pause();
    }
  } catch (error) {
    if (error instanceof Interrupted) throw error;
    return `${label}: bad deflate data (${shown(reasonOf(error), 80)})`;
  }
  if (over) return `${label} inflates past its declared ${entry.originalSize} bytes`;
  if (at !== out.length) return `${label} inflates to ${at} bytes, not its declared ${entry.originalSize}`;
  return out;
};
