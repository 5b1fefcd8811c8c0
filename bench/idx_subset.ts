/**
 * Writes a class-balanced subset of an IDX data set (MNIST, Fashion-MNIST) as a new IDX folder: the first
 * `PER_CLASS` training images of each class, in their original order, and the whole test split. For
 * measurements whose budget does not fit the full training split (the multi-crop ablation's six cells).
 *
 *   deno run -A bench/idx_subset.ts SOURCE_DIR OUT_DIR PER_CLASS
 */
import { gunzipSync } from "node:zlib";

const [source, out, perClassText] = Deno.args;
const perClass = Number(perClassText);
if (!source || !out || !Number.isInteger(perClass) || perClass < 1) {
  console.error("usage: deno run -A bench/idx_subset.ts SOURCE_DIR OUT_DIR PER_CLASS");
  Deno.exit(2);
}

const readIdx = (name: string): Uint8Array => {
  for (const candidate of [name, `${name}.gz`]) {
    try {
      const bytes = Deno.readFileSync(`${source}/${candidate}`);
      return candidate.endsWith(".gz") ? new Uint8Array(gunzipSync(bytes)) : bytes;
    } catch (error) {
      if (!(error instanceof Deno.errors.NotFound)) throw error;
    }
  }
  throw new Error(`${source}: no ${name}[.gz]`);
};

/** An IDX file's header length (magic + one 4-byte size per dimension) and its first dimension. */
const headerOf = (bytes: Uint8Array) => {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const dims = bytes[3];
  return { headerBytes: 4 + 4 * dims, count: view.getUint32(4) };
};

const images = readIdx("train-images-idx3-ubyte");
const labels = readIdx("train-labels-idx1-ubyte");
const imageHeader = headerOf(images);
const labelHeader = headerOf(labels);
const imageBytes = (images.length - imageHeader.headerBytes) / imageHeader.count;

const taken = new Map<number, number>();
const keep: number[] = [];
for (let i = 0; i < labelHeader.count; i++) {
  const label = labels[labelHeader.headerBytes + i];
  const n = taken.get(label) ?? 0;
  if (n < perClass) {
    taken.set(label, n + 1);
    keep.push(i);
  }
}

const withCount = (header: Uint8Array, count: number) => {
  const copy = header.slice();
  new DataView(copy.buffer).setUint32(4, count);
  return copy;
};
const subsetImages = new Uint8Array(imageHeader.headerBytes + keep.length * imageBytes);
subsetImages.set(withCount(images.subarray(0, imageHeader.headerBytes), keep.length));
const subsetLabels = new Uint8Array(labelHeader.headerBytes + keep.length);
subsetLabels.set(withCount(labels.subarray(0, labelHeader.headerBytes), keep.length));
keep.forEach((i, j) => {
  const from = imageHeader.headerBytes + i * imageBytes;
  subsetImages.set(images.subarray(from, from + imageBytes), imageHeader.headerBytes + j * imageBytes);
  subsetLabels[labelHeader.headerBytes + j] = labels[labelHeader.headerBytes + i];
});

Deno.mkdirSync(out, { recursive: true });
Deno.writeFileSync(`${out}/train-images-idx3-ubyte`, subsetImages);
Deno.writeFileSync(`${out}/train-labels-idx1-ubyte`, subsetLabels);
Deno.writeFileSync(`${out}/t10k-images-idx3-ubyte`, readIdx("t10k-images-idx3-ubyte"));
Deno.writeFileSync(`${out}/t10k-labels-idx1-ubyte`, readIdx("t10k-labels-idx1-ubyte"));
console.log(
  `${out}: ${keep.length} training images (${perClass} per class over ${taken.size} classes), full test split`,
);
