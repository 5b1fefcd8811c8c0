/**
 * CIFAR-10 / CIFAR-100 binary batches ("binary version" downloads).
 *
 * A record is the label byte(s) then 3072 pixel bytes: the red plane (32x32,
 * row-major), then green, then blue. CIFAR-10 has one label byte; CIFAR-100 has
 * two (coarse, fine) and swav-ts uses the fine label (100 classes).
 */
import type { RgbImage } from "./image_codec.ts";

export const CIFAR_SIDE = 32;
const PLANE = CIFAR_SIDE * CIFAR_SIDE;
export const CIFAR_PIXELS = 3 * PLANE;

export type CifarVariant = "cifar10" | "cifar100";

/** Bytes per record: label byte(s) plus pixels. */
export const recordLength = (variant: CifarVariant): number => (variant === "cifar10" ? 1 : 2) + CIFAR_PIXELS;

/** The label of record `index` (CIFAR-100: the fine label). */
export const cifarLabel = (records: Uint8Array, variant: CifarVariant, index: number): number =>
  records[index * recordLength(variant) + (variant === "cifar10" ? 0 : 1)];

/** Classes of a variant: CIFAR-10's 10, CIFAR-100's 100 fine labels (its coarse labels: 20). */
export const cifarClassCount = (variant: CifarVariant): number => variant === "cifar10" ? 10 : 100;

/**
 * The first record whose label is outside the variant's classes (CIFAR-100: a
 * fine label over 99 or a coarse one over 19), or undefined when all are valid.
 * Checked when a batch is opened: a bad label would otherwise train silently and
 * break kNN later.
 */
export const invalidCifarLabel = (
  records: Uint8Array,
  variant: CifarVariant,
):
  | { readonly record: number; readonly label: number; readonly field: string; readonly classes: number }
  | undefined => {
  const size = recordLength(variant);
  const classes = cifarClassCount(variant);
  for (let record = 0; record * size < records.length; record++) {
    const at = record * size;
    if (variant === "cifar100" && records[at]! >= 20) {
      return { record, label: records[at]!, field: "coarse label", classes: 20 };
    }
    const label = records[at + (variant === "cifar10" ? 0 : 1)]!;
    if (label >= classes) return { record, label, field: "label", classes };
  }
  return undefined;
};

/** The image of record `index`, converted from planar CHW to HWC RGB. */
export const cifarImage = (records: Uint8Array, variant: CifarVariant, index: number): RgbImage => {
  const start = index * recordLength(variant) + (variant === "cifar10" ? 1 : 2);
  const data = new Uint8Array(CIFAR_PIXELS);
  for (let p = 0; p < PLANE; p++) {
    data[3 * p] = records[start + p];
    data[3 * p + 1] = records[start + PLANE + p];
    data[3 * p + 2] = records[start + 2 * PLANE + p];
  }
  return { width: CIFAR_SIDE, height: CIFAR_SIDE, data };
};

/** Encodes HWC RGB images and labels as CIFAR records (tests and tools). */
export const encodeCifar = (
  variant: CifarVariant,
  samples: ReadonlyArray<{ image: RgbImage; label: number; coarse?: number }>,
): Uint8Array => {
  const length = recordLength(variant);
  const out = new Uint8Array(samples.length * length);
  samples.forEach(({ image, label, coarse }, i) => {
    let o = i * length;
    if (variant === "cifar100") out[o++] = coarse ?? 0;
    out[o++] = label;
    for (let p = 0; p < PLANE; p++) {
      for (let c = 0; c < 3; c++) out[o + c * PLANE + p] = image.data[3 * p + c];
    }
  });
  return out;
};
