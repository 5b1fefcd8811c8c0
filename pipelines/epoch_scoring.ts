/**
 * What scores the features at the end of each epoch during pretraining: the
 * kNN check on the labelled splits (every `train.knnEvery` epochs) and the
 * online probe (`train.onlineProbe`), both on rank 0 alone.
 */
import * as tf from "@tensorflow/tfjs";
import { Effect } from "effect";
import type { Communicator } from "../backend/communicator.ts";
import type { RunConfig } from "../config/config.ts";
import { type DataSource, openSource } from "../data/sources.ts";
import type { SwavModel } from "../models/model.ts";
import { knnTop1 } from "./knn.ts";
import { makeOnlineProbe, type OnlineProbe } from "./online_probe.ts";
import { resolveSourceSpec } from "./sources.ts";
import { sourceOptions, withSplit } from "./training_data.ts";

/** The labelled train/test splits for the periodic kNN check, when asked for and the source has labels. */
export const openKnnSources = (config: RunConfig, labelled: boolean) =>
  Effect.gen(function* () {
    if (config.train.knnEvery <= 0 || !labelled) return undefined;
    const { source, testSource } = config.data;
    const train = yield* openSource(
      yield* resolveSourceSpec(withSplit(source, "train")),
      sourceOptions(config),
    );
    const test = yield* openSource(
      yield* resolveSourceSpec(testSource ?? withSplit(source, "test")),
      sourceOptions(config),
    );
    return { train, test };
  });

/**
 * What scores the features after each epoch: the kNN's train/test sources and the online probe.
 * Rank 0 alone reports, so it alone scores (the probe trains on its shard's features).
 */
export const openEpochScoring = (
  config: RunConfig,
  model: SwavModel,
  source: DataSource,
  comm: Communicator,
) =>
  Effect.gen(function* () {
    if (comm.rank !== 0) return { knnSources: undefined, probe: undefined };
    const knnSources = yield* openKnnSources(config, source.classes !== undefined);
    const probe = yield* onlineProbeFor(config, model, source.classes?.length, knnSources?.test);
    return { knnSources, probe };
  });

/** The end of an epoch's kNN top-1 (every `knnEvery` epochs) and online-probe top-1, where they run. */
export const scoreEpoch = (
  config: RunConfig,
  model: SwavModel,
  epoch: number,
  knnSources: { readonly train: DataSource; readonly test: DataSource } | undefined,
  probe: { readonly probe: OnlineProbe; readonly test: DataSource } | undefined,
) =>
  Effect.gen(function* () {
    const knn = knnSources !== undefined && (epoch + 1) % config.train.knnEvery === 0
      ? yield* knnTop1(model, knnSources.train, knnSources.test, config)
      : undefined;
    const probeTop1 = probe !== undefined ? yield* probe.probe.top1(model, probe.test, config) : undefined;
    return { knn, probeTop1 };
  });

/** The online probe and its test split, when train.onlineProbe asks for one and the source has labels. */
const onlineProbeFor = (
  config: RunConfig,
  model: SwavModel,
  classes: number | undefined,
  knnTest: DataSource | undefined,
) =>
  Effect.gen(function* () {
    if (!config.train.onlineProbe || classes === undefined || classes < 2) return undefined;
    const test = knnTest ?? (yield* openSource(
      yield* resolveSourceSpec(config.data.testSource ?? withSplit(config.data.source, "test")),
      sourceOptions(config),
    ));
    return { probe: yield* makeOnlineProbe(model.plan.featureDim, classes), test };
  });

/** One probe step on the first crop's features (rows [0, batch) of the crop-major features). */
export const trainProbe = (probe: OnlineProbe, features: tf.Tensor2D, labels: Int32Array) => {
  const first = tf.tidy(() => features.slice([0, 0], [labels.length, -1]));
  try {
    probe.train(first, labels);
  } finally {
    first.dispose();
  }
};
