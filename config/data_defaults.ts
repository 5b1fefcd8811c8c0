/**
 * Defaults that depend on the data set. Filled in only where the config does
 * not say, before validation; the resolved values are written to the run
 * folder's config.json.
 *
 *   model.prototypes   the reference's 3000; for a small labelled set (fewer than
 *                      SMALL_DATA_IMAGES = 100,000 images) 10 x its classes (the SwAV
 *                      notes' advice: on a few thousand images of ten classes 3000
 *                      prototypes leave most of them empty); for a small unlabelled
 *                      set N/20, clamped to [30, 3000]
 *   swav.queueLength   a queue only where it can help and will run: a global batch
 *                      under 256 (the reference's queue is for its batch-256 recipe and
 *                      smaller) and a run long enough to reach swav.queueStartEpoch;
 *                      then 3840 (the reference's), at most a quarter of the data set
 *                      (rounded down to a multiple of the batch by the queue itself).
 *                      Otherwise 0.
 *   multicrop.sizeCrops  for the small-data recipe only (`cropSideFromData`: the CLI asks when the user's
 *                      config names no sizeCrops), with one size group:
 *                      at the images' own shorter side (28 for Fashion-MNIST, 32 for CIFAR);
 *                      and for a grey source (IDX) multicrop.channels and model.inputChannels 1.
 */
import type { DataSource } from "../data/sources.ts";

/** Below this many training images a data set gets the small-data prototype rule. */
export const SMALL_DATA_IMAGES = 100_000;

const isObject = (value: unknown): value is Record<string, unknown> =>
  typeof value === "object" && value !== null && !Array.isArray(value);

const section = (raw: Record<string, unknown>, key: string): Record<string, unknown> =>
  isObject(raw[key]) ? raw[key] as Record<string, unknown> : {};

export interface DataFacts {
  readonly classes: number | undefined;
  readonly length: number;
  /** Shorter side of the first image, where it was read. */
  readonly imageSide?: number | undefined;
  /** The channels the source feeds (1 for grey sets such as IDX), where known. */
  readonly channels?: 1 | 3 | undefined;
}

export const factsOf = (source: DataSource, imageSide?: number): DataFacts => ({
  classes: source.classes?.length,
  length: source.length,
  imageSide,
  channels: source.channels,
});

/** The prototype count for a data set (see the module comment). */
export const defaultPrototypes = (facts: DataFacts): number => {
  if (facts.length >= SMALL_DATA_IMAGES) return 3000;
  return facts.classes !== undefined && facts.classes > 1
    ? 10 * facts.classes
    : Math.min(3000, Math.max(30, Math.round(facts.length / 20)));
};

const number = (value: unknown, fallback: number): number => typeof value === "number" ? value : fallback;

/** Fills `model.prototypes`, `swav.queueLength` (and, when asked, the crop size) where `raw` leaves them out. */
export const withDataDefaults = (
  raw: unknown,
  facts: DataFacts,
  options: { readonly defaultBatchSize?: number; readonly cropSideFromData?: boolean } = {},
): unknown => {
  const config = isObject(raw) ? raw : {};
  const model = section(config, "model");
  const swav = section(config, "swav");
  const train = section(config, "train");
  const multicrop = section(config, "multicrop");
  const batchSize = number(train["batchSize"], options.defaultBatchSize ?? 64);
  const epochs = number(train["epochs"], 100);
  const queueStart = number(swav["queueStartEpoch"], 15);
  const prototypes = model["prototypes"] ?? defaultPrototypes(facts);
  const queueLength = swav["queueLength"] ??
    (batchSize < 256 && queueStart < epochs ? Math.min(3840, Math.floor(facts.length / 4)) : 0);
  const side = facts.imageSide;
  // The caller asks only where the user's own config names no crop size (the preset's 32 is a fallback).
  const oneGroup = Array.isArray(multicrop["nmbCrops"]) && multicrop["nmbCrops"].length === 1;
  const fromData = options.cropSideFromData === true;
  const crops = {
    ...(fromData && oneGroup && side !== undefined ? { sizeCrops: [side] } : {}),
    ...(fromData && facts.channels === 1 && multicrop["channels"] === undefined ? { channels: 1 } : {}),
  };
  const channels = fromData && facts.channels === 1 && model["inputChannels"] === undefined
    ? { inputChannels: 1 }
    : {};
  return {
    ...config,
    ...(Object.keys(crops).length === 0 ? {} : { multicrop: { ...multicrop, ...crops } }),
    model: { ...model, ...channels, prototypes },
    swav: { ...swav, queueLength },
  };
};
