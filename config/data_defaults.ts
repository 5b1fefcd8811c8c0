/**
 * Defaults that depend on the data set, for small data sets: the SwAV
 * reference's 3000 prototypes and no queue suit ImageNet at batch 4096; on a
 * few thousand images of ten classes they leave most prototypes empty. Filled
 * in only where the config does not say, before validation; the resolved
 * values are written to the run folder's config.json.
 *
 *   model.prototypes   10 x the classes of a labelled source (the SwAV notes' advice);
 *                      for an unlabelled one N/20, clamped to [30, 3000]
 *   swav.queueLength   for batches under 256, a queue of a quarter of the data set,
 *                      capped at the reference's 3840 (rounded down to a multiple of the
 *                      batch by the queue itself); 0 otherwise. It starts at swav.queueStartEpoch.
 */
import type { DataSource } from "../data/sources.ts";

const isObject = (value: unknown): value is Record<string, unknown> =>
  typeof value === "object" && value !== null && !Array.isArray(value);

const section = (raw: Record<string, unknown>, key: string): Record<string, unknown> =>
  isObject(raw[key]) ? raw[key] as Record<string, unknown> : {};

export interface DataFacts {
  readonly classes: number | undefined;
  readonly length: number;
}

export const factsOf = (source: DataSource): DataFacts => ({
  classes: source.classes?.length,
  length: source.length,
});

/** Fills `model.prototypes` and `swav.queueLength` from the data where `raw` leaves them out. */
export const withDataDefaults = (raw: unknown, facts: DataFacts, defaultBatchSize = 64): unknown => {
  const config = isObject(raw) ? raw : {};
  const model = section(config, "model");
  const swav = section(config, "swav");
  const train = section(config, "train");
  const batchSize = typeof train["batchSize"] === "number" ? train["batchSize"] : defaultBatchSize;
  const prototypes = model["prototypes"] ??
    (facts.classes !== undefined && facts.classes > 1
      ? 10 * facts.classes
      : Math.min(3000, Math.max(30, Math.round(facts.length / 20))));
  const queueLength = swav["queueLength"] ??
    (batchSize < 256 ? Math.min(3840, Math.floor(facts.length / 4)) : 0);
  return { ...config, model: { ...model, prototypes }, swav: { ...swav, queueLength } };
};
