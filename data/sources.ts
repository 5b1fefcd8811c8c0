/**
 * Data sources: a SOURCE spec (a path, optionally suffixed `:train` / `:test`)
 * detected as one of
 *
 * - `idx`: a folder of IDX files, raw or gzipped (`train-images-idx3-ubyte[.gz]`,
 *   `t10k-labels-idx1-ubyte[.gz]`, ...: MNIST / Fashion-MNIST);
 * - `cifar10` / `cifar100`: a folder of CIFAR binary batches (`data_batch_N[.bin]` +
 *   `test_batch[.bin]`, or `train[.bin]` + `test[.bin]`);
 * - `folder`: images in one subfolder per class (labels = sorted subfolder names);
 *   with `train/` and `val/` (or `test/`) subfolders those are the splits (ImageNet layout);
 * - `flat`: images directly in the folder, unlabelled (label -1).
 *
 * IDX and CIFAR records are loaded once (they are small); image folders are listed
 * once and their files read lazily, so a folder far larger than RAM streams.
 */
import { Effect, Schema } from "effect";
import { DecodeError, decodeImage, readImageFile, type RgbImage } from "./image_codec.ts";
import { reasonOf } from "./errors.ts";
import { MAX_IDX_BYTES, parseIdx } from "./idx.ts";
import { readRegularFile } from "./files.ts";
import { readRegularText } from "./bounded_read.ts";
import { cifarImage, cifarLabel, type CifarVariant, invalidCifarLabel, recordLength } from "./cifar.ts";

/** A source that cannot be opened: a missing folder, unknown layout, a malformed record file. */
export class SourceError extends Schema.TaggedError<SourceError>()("SourceError", {
  path: Schema.String,
  reason: Schema.String,
}) {
  /** The path and the reason, on one line. */
  override get message(): string {
    return `${this.path}: ${this.reason}`;
  }
}

/** Which split of a data set a source reads (`:test` and `:val` in a SOURCE spec read the test split). */
export type Split = "train" | "test";
/** The layout a source was detected as: IDX files (MNIST, Fashion-MNIST), CIFAR binaries, an image folder with class subfolders, or a flat folder of unlabelled images. */
export type SourceKind = "idx" | "cifar10" | "cifar100" | "folder" | "flat";

/** A decoded sample; `label` is -1 for unlabelled data. */
export interface Sample {
  /** The decoded image. */
  readonly image: RgbImage;
  /** Class index, or -1 for unlabelled data. */
  readonly label: number;
}

/**
 * A sample before decoding: the encoded file bytes (image folders) or the pixels
 * (record formats). Cheap to produce (I/O only), so the loader fetches on the main
 * thread and ships it to a worker for the CPU work.
 */
export type RawSample =
  | { readonly kind: "encoded"; readonly path: string; readonly label: number; readonly bytes: Uint8Array }
  | { readonly kind: "pixels"; readonly path: string; readonly label: number; readonly image: RgbImage };

/** A data set opened by `openSource`: its size, class names and channel count, and random access to its samples. */
export interface DataSource {
  /** The detected layout. */
  readonly kind: SourceKind;
  /** The folder, as given. */
  readonly path: string;
  /** The split read. */
  readonly split: Split;
  /** Number of samples. */
  readonly length: number;
  /** Class names, label i is `classes[i]`; absent for unlabelled data. */
  readonly classes?: readonly string[];
  /** What the pipeline feeds the encoder: 1 for grey data sets, else 3. */
  readonly channels: 1 | 3;
  /** Sample `index` before decoding. */
  fetch(index: number): Effect.Effect<RawSample, DecodeError>;
  /** Sample `index`, decoded on this thread. */
  read(index: number): Effect.Effect<Sample, DecodeError>;
}

export interface SourceOptions {
  /** Overrides the channel count the data set would pick (1 for IDX, else 3). */
  readonly channels?: 1 | 3;
}

/** Splits `path[:train|:test|:val]`; `val` is the held-out split, named `test` here. */
export const parseSourceSpec = (spec: string): { path: string; split: Split } => {
  const match = /^(.*):(train|test|val)$/.exec(spec);
  if (!match) return { path: spec, split: "train" };
  return { path: match[1], split: match[2] === "train" ? "train" : "test" };
};

const IMAGE_EXTENSION = /\.(png|jpe?g)$/i;

/** Opens a SOURCE spec, detecting its kind from the folder's contents. */
export const openSource = (
  spec: string,
  options: SourceOptions = {},
): Effect.Effect<DataSource, SourceError> => {
  const { path, split } = parseSourceSpec(spec);
  return open(path, split, options);
};

const sourceError = (path: string, reason: string) => Effect.fail(new SourceError({ path, reason }));

const open = (path: string, split: Split, options: SourceOptions): Effect.Effect<DataSource, SourceError> =>
  Effect.gen(function* () {
    const info = yield* Effect.tryPromise({
      try: () => Deno.stat(path),
      catch: (cause) =>
        new SourceError({
          path,
          reason: cause instanceof Deno.errors.NotFound
            ? "no such folder"
            : `cannot open: ${reasonOf(cause)}`,
        }),
    });
    if (!info.isDirectory) return yield* sourceError(path, "not a folder (a SOURCE is a folder)");
    const entries = yield* listDir(path);
    const files = entries.filter((e) => e.isFile).map((e) => e.name);
    const dirs = entries.filter((e) => e.isDirectory).map((e) => e.name);

    const idx = findIdx(files, split);
    if (idx) return yield* openIdx(path, split, idx, options);
    const cifar = findCifar(files, split);
    if (cifar) return yield* openCifar(path, split, cifar.variant, cifar.files, options);

    const held = dirs.find((d) => d === "val") ?? dirs.find((d) => d === "test");
    if (dirs.includes("train") && held) {
      // Classes from both splits, so a class missing from one split cannot shift the labels.
      const classes = [
        ...new Set([...yield* classDirs(join(path, "train")), ...yield* classDirs(join(path, held))]),
      ]
        .sort();
      const folder = join(path, split === "train" ? "train" : held);
      return yield* openImageFolder(path, folder, split, classes, options);
    }
    const classes = yield* classDirs(path);
    if (classes.length > 0 || files.some((f) => IMAGE_EXTENSION.test(f))) {
      if (split === "test") {
        return yield* sourceError(path, "no test split (needs train/ and val/ or test/ subfolders)");
      }
      return yield* openImageFolder(path, path, split, classes.length > 0 ? classes : undefined, options);
    }
    return yield* sourceError(
      path,
      "no data found: expected IDX files, CIFAR binary batches, class subfolders of images, or images",
    );
  });

const join = (...parts: string[]) => parts.join("/").replace(/\/+/g, "/");

const listDir = (path: string): Effect.Effect<Deno.DirEntry[], SourceError> =>
  Effect.tryPromise({
    try: async () => {
      const out: Deno.DirEntry[] = [];
      for await (const entry of Deno.readDir(path)) if (!entry.name.startsWith(".")) out.push(entry);
      return out.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
    },
    catch: (cause) => new SourceError({ path, reason: `cannot list folder: ${reasonOf(cause)}` }),
  });

/** Subfolders that hold at least one image (anywhere below them). */
const classDirs = (path: string): Effect.Effect<string[], SourceError> =>
  Effect.gen(function* () {
    const out: string[] = [];
    for (const entry of yield* listDir(path)) {
      if (entry.isDirectory && (yield* imagesUnder(join(path, entry.name), 1)).length > 0) {
        out.push(entry.name);
      }
    }
    return out;
  });

/** Image files below `path`, recursively, in sorted order; stops after `limit`. */
const imagesUnder = (path: string, limit = Infinity): Effect.Effect<string[], SourceError> =>
  Effect.gen(function* () {
    const out: string[] = [];
    const walk = (dir: string): Effect.Effect<void, SourceError> =>
      Effect.gen(function* () {
        for (const entry of yield* listDir(dir)) {
          if (out.length >= limit) return;
          const full = join(dir, entry.name);
          // Anything named like an image is a sample, whatever it is: a directory, a FIFO, a
          // dangling or looping symlink is then skipped and named by the loader like a corrupt file.
          if (IMAGE_EXTENSION.test(entry.name)) out.push(full);
          else if (entry.isDirectory) yield* walk(full);
        }
      });
    yield* walk(path);
    return out;
  });

/** A record file (IDX, CIFAR): a regular file of at most `MAX_IDX_BYTES`. */
const readFile = (path: string): Effect.Effect<Uint8Array, SourceError> =>
  Effect.tryPromise({
    try: () => readRegularFile(path, MAX_IDX_BYTES),
    catch: (cause) => new SourceError({ path, reason: `cannot read: ${reasonOf(cause)}` }),
  }).pipe(Effect.flatMap((out) =>
    typeof out === "string"
      ? Effect.fail(new SourceError({ path, reason: `cannot read: ${out}` }))
      : Effect.succeed(out)
  ));

const outOfRange = (path: string, index: number, length: number) =>
  Effect.fail(new DecodeError({ path, reason: `sample index ${index} out of range [0, ${length})` }));

/** Decodes a raw sample on this thread (record formats are already pixels). */
export const decodeRaw = (raw: RawSample): Effect.Effect<Sample, DecodeError> =>
  raw.kind === "encoded"
    ? Effect.map(decodeImage(raw.bytes, raw.path), (image) => ({ image, label: raw.label }))
    : Effect.succeed({ image: raw.image, label: raw.label });

const withRead = (source: Omit<DataSource, "read">): DataSource => ({
  ...source,
  read: (index) => Effect.flatMap(source.fetch(index), decodeRaw),
});

// ---------------------------------------------------------------------------------------------
// IDX

const findIdx = (files: string[], split: Split) => {
  const prefix = split === "train" ? "train" : "t10k";
  const images = files.find((f) => new RegExp(`^${prefix}-images[.-]idx3-ubyte(\\.gz)?$`).test(f));
  const labels = files.find((f) => new RegExp(`^${prefix}-labels[.-]idx1-ubyte(\\.gz)?$`).test(f));
  const anyIdx = files.some((f) => /-idx[13]-ubyte(\.gz)?$/.test(f));
  return images && labels ? { images, labels } : anyIdx ? { images, labels } : undefined;
};

const openIdx = (
  path: string,
  split: Split,
  names: { images?: string; labels?: string },
  options: SourceOptions,
): Effect.Effect<DataSource, SourceError> =>
  Effect.gen(function* () {
    if (!names.images || !names.labels) {
      const prefix = split === "train" ? "train" : "t10k";
      return yield* sourceError(
        path,
        `IDX folder lacks ${prefix}-images-idx3-ubyte[.gz] or ${prefix}-labels-idx1-ubyte[.gz]`,
      );
    }
    const load = (name: string) => {
      const file = join(path, name);
      return Effect.flatMap(readFile(file), (bytes) =>
        Effect.mapError(parseIdx(bytes, file), (error) =>
          new SourceError({ path: file, reason: error.reason })));
    };
    const images = yield* load(names.images);
    const labels = yield* load(names.labels);
    if (images.dims.length !== 3 || labels.dims.length !== 1 || images.dims[0] !== labels.dims[0]) {
      return yield* sourceError(
        path,
        `IDX shapes do not match: images [${images.dims}], labels [${labels.dims}]`,
      );
    }
    const [length, height, width] = images.dims;
    const pixels = height * width;
    const classCount = labels.data.reduce((m, v) =>
      Math.max(m, v), 0) + 1;
    const imagePath = join(path, names.images);
    return withRead({
      kind: "idx",
      path,
      split,
      length,
      classes: Array.from({ length: classCount }, (_, i) =>
        String(i)),
      channels: options.channels ?? 1,
      fetch: (index) => {
        if (!(index >= 0 && index < length)) return outOfRange(imagePath, index, length);
        const grey = images.data.subarray(index * pixels, (index + 1) * pixels);
        const data = new Uint8Array(pixels * 3);
        for (let p = 0; p < pixels; p++) data[3 * p] = data[3 * p + 1] = data[3 * p + 2] = grey[p];
        return Effect.succeed({
          kind: "pixels" as const,
          path: `${imagePath}#${index}`,
          label: labels.data[index],
          image: { width, height, data },
        });
      },
    });
  });

// ---------------------------------------------------------------------------------------------
// CIFAR

const findCifar = (files: string[], split: Split) => {
  const ten = files.filter((f) => /^data_batch_\d+(\.bin)?$/.test(f));
  const tenTest = files.filter((f) => /^test_batch(\.bin)?$/.test(f));
  if (ten.length > 0 || tenTest.length > 0) {
    return {
      variant: "cifar10" as CifarVariant,
      files: (split === "train" ? ten : tenTest).sort((a, b) => batchNumber(a) - batchNumber(b)),
    };
  }
  const hundred = files.filter((f) => (split === "train" ? /^train(\.bin)?$/ : /^test(\.bin)?$/).test(f));
  if (hundred.length > 0 || files.some((f) => /^(train|test)\.bin$/.test(f))) {
    return { variant: "cifar100" as CifarVariant, files: hundred.slice(0, 1) };
  }
  return undefined;
};

const batchNumber = (name: string) => Number(/\d+/.exec(name)?.[0] ?? 0);

const openCifar = (
  path: string,
  split: Split,
  variant: CifarVariant,
  names: string[],
  options: SourceOptions,
): Effect.Effect<DataSource, SourceError> =>
  Effect.gen(function* () {
    if (names.length === 0) return yield* sourceError(path, `${variant} folder has no ${split} batch`);
    const size = recordLength(variant);
    const parts: Uint8Array[] = [];
    for (const name of names) {
      const bytes = yield* readFile(join(path, name));
      if (bytes[0] === 0x80) {
        return yield* sourceError(
          join(path, name),
          "this is the Python (pickle) version of CIFAR; use the binary version (*-bin)",
        );
      }
      if (bytes.length === 0 || bytes.length % size !== 0) {
        return yield* sourceError(
          join(path, name),
          `size ${bytes.length} is not a multiple of the ${variant} record size ${size}`,
        );
      }
      const invalid = invalidCifarLabel(bytes, variant);
      if (invalid) {
        return yield* sourceError(
          join(path, name),
          `record ${invalid.record} has ${invalid.field} ${invalid.label}, outside ${variant}'s 0..${
            invalid.classes - 1
          }: a corrupt file, or not ${variant}`,
        );
      }
      parts.push(bytes);
    }
    const records = parts.length === 1 ? parts[0] : concatBytes(parts);
    const length = records.length / size;
    const classes = yield* cifarClasses(path, variant);
    return withRead({
      kind: variant,
      path,
      split,
      length,
      classes,
      channels: options.channels ?? 3,
      fetch: (index) =>
        index >= 0 && index < length
          ? Effect.succeed({
            kind: "pixels" as const,
            path: `${path}#${split}:${index}`,
            label: cifarLabel(records, variant, index),
            image: cifarImage(records, variant, index),
          })
          : outOfRange(path, index, length),
    });
  });

/** Class names from the data set's names file, or numbered classes when it is missing or malformed. */
const cifarClasses = (path: string, variant: CifarVariant): Effect.Effect<string[]> => {
  const file = join(path, variant === "cifar10" ? "batches.meta.txt" : "fine_label_names.txt");
  const count = variant === "cifar10" ? 10 : 100;
  const numbered = () => Array.from({ length: count }, (_, i) => String(i));
  // The names file is a few hundred bytes; 1 MiB is far more than 100 names need.
  return readRegularText(file, 2 ** 20).pipe(
    Effect.map((text) => text.split(/\r?\n/).map((s) => s.trim()).filter((s) => s.length > 0)),
    Effect.map((names) => names.length === count ? names : numbered()),
    Effect.orElseSucceed(numbered),
  );
};

const concatBytes = (parts: Uint8Array[]): Uint8Array => {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const part of parts) {
    out.set(part, at);
    at += part.length;
  }
  return out;
};

// ---------------------------------------------------------------------------------------------
// Image folders

const openImageFolder = (
  root: string,
  folder: string,
  split: Split,
  classes: string[] | undefined,
  options: SourceOptions,
): Effect.Effect<DataSource, SourceError> =>
  Effect.gen(function* () {
    const files: string[] = [];
    const labels: number[] = [];
    if (classes) {
      const present = new Set((yield* listDir(folder)).filter((e) => e.isDirectory).map((e) => e.name));
      for (const [label, name] of classes.entries()) {
        if (!present.has(name)) continue;
        for (const file of yield* imagesUnder(join(folder, name))) {
          files.push(file);
          labels.push(label);
        }
      }
    } else {
      for (const entry of yield* listDir(folder)) {
        if (IMAGE_EXTENSION.test(entry.name)) {
          files.push(join(folder, entry.name));
          labels.push(-1);
        }
      }
    }
    if (files.length === 0) return yield* sourceError(folder, "no PNG or JPEG images found");
    const fetch = (index: number): Effect.Effect<RawSample, DecodeError> => {
      if (!(index >= 0 && index < files.length)) return outOfRange(folder, index, files.length);
      const path = files[index];
      return readImageFile(path).pipe(
        Effect.map((bytes) => ({ kind: "encoded" as const, path, label: labels[index], bytes })),
      );
    };
    return withRead({
      kind: classes ? "folder" : "flat",
      path: root,
      split,
      length: files.length,
      ...(classes ? { classes } : {}),
      channels: options.channels ?? 3,
      fetch,
    });
  });
