/**
 * A run's training data: the source, opened and checked against one batch, and
 * its loader (decode -> multicrop in a Worker pool, batched; with several ranks,
 * this rank's shard). Also the source-spec helpers the other pipelines share.
 */
import { Effect, Schema } from "effect";
import type { Communicator } from "../backend/communicator.ts";
import type { RunConfig } from "../config/config.ts";
import { makeLoader } from "../data/loader.ts";
import { openSource } from "../data/sources.ts";
import { multicropPrepare } from "../stages/multicrop.ts";
import { resolveSourceSpec } from "./sources.ts";

/** Fewer samples than one batch. */
export class DatasetTooSmall extends Schema.TaggedError<DatasetTooSmall>()("DatasetTooSmall", {
  message: Schema.String,
}) {}

/** The source options a run config asks for (its channel count, where given). */
export const sourceOptions = (config: RunConfig) =>
  config.data.channels === undefined ? {} : { channels: config.data.channels };

/**
 * The training source and its loader: decode -> multicrop in a Worker pool,
 * batched (the scope stops it); with several ranks, this rank's shard of each
 * epoch in batches of `batchSize` (the rank's share of the global batch).
 */
export const openTrainingData = (config: RunConfig, batchSize: number, comm: Communicator) =>
  Effect.gen(function* () {
    const { seed } = config.train;
    const source = yield* openSource(yield* resolveSourceSpec(config.data.source), sourceOptions(config));
    if (source.length < config.train.batchSize) {
      return yield* new DatasetTooSmall({
        message: `the data set has ${source.length} samples, fewer than one batch of ` +
          `${config.train.batchSize}: lower train.batchSize`,
      });
    }
    const loader = yield* makeLoader({
      source,
      prepare: multicropPrepare(config.multicrop),
      seed,
      batchSize,
      dropLast: true,
      workers: config.data.workers,
      bufferBatches: config.data.prefetch,
      onError: config.data.onError,
      ...(comm.size > 1 ? { shard: { rank: comm.rank, size: comm.size } } : {}),
    });
    return { source, loader };
  });

/** `path[:split]` with its split replaced. */
export const withSplit = (spec: string, split: "train" | "test"): string =>
  `${spec.replace(/:(train|test|val)$/, "")}:${split}`;
