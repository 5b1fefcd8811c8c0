/**
 * DeepCluster-v2 (main_deepclusterv2.py) as a method of the generic step:
 *
 *   before the first epoch  the memory bank filled by a no-gradient pass, one forward per assignment
 *                           crop with batch norm in training mode (the reference's `init_memory`)
 *   each epoch start        per head h, spherical k-means over bank h mod len(cropsForAssign); the
 *                           head's prototypes become the centroids, each sample's target its cluster
 *   on one tape             encode -> scores per head -> cross-entropy to the targets (stages/cluster_loss.ts)
 *   state update            the batch's assignment-crop embeddings into the bank
 *
 * The bank is kept by global sample id and the k-means starts from rows chosen by a seeded draw over
 * sample ids, so the clusters do not depend on the order of the writes.
 */
import * as tf from "@tensorflow/tfjs";
import { Effect, Schema, Stream } from "effect";
import type { RunConfig } from "../config/config.ts";
import type { Batch } from "../data/loader.ts";
import { rngFor } from "../data/rng.ts";
import { prototypeHeads, type SwavModel } from "../models/model.ts";
import { clusterLoss, NO_TARGET } from "../stages/cluster_loss.ts";
import { encodeStage } from "../stages/encode.ts";
import { sphericalKmeans } from "../stages/kmeans.ts";
import { collateCrops } from "../stages/multicrop.ts";
import {
  batchTargets,
  type MemoryBank,
  presentIds,
  rowsOf,
  writeBatch,
  writeCrop,
} from "../state/memory_bank.ts";
import type { Method, StepState } from "./train_step.ts";

/** The bank holds fewer samples than a head has prototypes. */
export class BankTooSmall extends Schema.TaggedError<BankTooSmall>()("BankTooSmall", {
  message: Schema.String,
}) {}

/** Stream tag of the k-means starting draw (apart from the data and initialisation keys). */
const KMEANS_STREAM = 0x1417_0031;

/**
 * The starting centroids of head `head` at `epoch`: `k` distinct positions into the bank's present
 * ids, a seeded partial Fisher-Yates draw (the reference's randperm(n)[:K], keyed by the run's seed).
 */
export const startRows = (n: number, k: number, seed: number, epoch: number, head: number): Int32Array => {
  const rng = rngFor(seed, KMEANS_STREAM, epoch, head);
  const order = Int32Array.from({ length: n }, (_, i) => i);
  for (let i = 0; i < k; i++) {
    const j = rng.int(i, n - 1);
    [order[i], order[j]] = [order[j]!, order[i]!];
  }
  return order.slice(0, k);
};

/**
 * The epoch-start clustering (the reference's `cluster_memory`): per head of `heads` (K each), k-means
 * over bank h mod the banks' count, present rows only, from `start(head, n, k)` (positions into the
 * present ids, ascending); the targets set to the clusters (−100 for samples not in the bank), the
 * bank's presence cleared for the new epoch. The heads' centroids [K, dim] (the new prototypes).
 */
export const clusterMemory = (
  bank: MemoryBank,
  heads: readonly number[],
  iterations: number,
  start: (head: number, n: number, k: number) => Int32Array,
): Effect.Effect<Float32Array[], BankTooSmall> =>
  Effect.gen(function* () {
    const ids = presentIds(bank);
    const centroidsPerHead: Float32Array[] = [];
    for (const [h, k] of heads.entries()) {
      if (ids.length < k) {
        return yield* new BankTooSmall({
          message: `the memory bank holds ${ids.length} samples, fewer than the ${k} prototypes of ` +
            `head ${h}: lower model.prototypes or train on more data`,
        });
      }
      const { centroids, assignments } = yield* sphericalKmeans({
        rows: rowsOf(bank, h % bank.banks.length, ids),
        n: ids.length,
        dim: bank.dim,
        start: start(h, ids.length, k),
        iterations,
      }).pipe(Effect.mapError((e) => new BankTooSmall({ message: e.message })));
      centroidsPerHead.push(centroids);
      const targets = bank.targets[h]!;
      targets.fill(NO_TARGET);
      ids.forEach((id, r) => targets[id] = assignments[r]!);
    }
    bank.present.fill(0);
    return centroidsPerHead;
  });

/** The prototypes of every head set to the centroids. */
export const setPrototypes = (model: SwavModel, centroids: readonly Float32Array[]): void => {
  prototypeHeads(model.config).forEach((head, h) => {
    tf.tidy(() => model.param(head.name).assign(tf.tensor2d(centroids[h]!, [head.k, model.config.out])));
  });
};

/** One no-gradient forward (batch norm in training mode) of a batch's crop `crop`: its embeddings. */
const embedCrop = (model: SwavModel, batch: Batch, config: RunConfig, crop: number) =>
  Effect.promise(async () => {
    // The crop's resolution group holds it at its place among the group's crops.
    const one = collateCrops(batch.views.map((views) => [views[crop]!]), {
      nmbCrops: [1],
      sizeCrops: [sizeOfCrop(config, crop)],
      channels: config.multicrop.channels,
    });
    const z = tf.tidy(() => encodeStage.apply({ training: true })({ model, cropGroups: one }).embeddings);
    tf.dispose(one);
    try {
      return new Float32Array(await z.data());
    } finally {
      z.dispose();
    }
  });

/** The pixel size of crop `crop` (crops are listed group by group). */
const sizeOfCrop = (config: RunConfig, crop: number): number => {
  let first = 0;
  for (const [g, count] of config.multicrop.nmbCrops.entries()) {
    if (crop < first + count) return config.multicrop.sizeCrops[g]!;
    first += count;
  }
  return config.multicrop.sizeCrops[0]!;
};

/** The reference's `init_memory`: every batch of `batches`, one forward per assignment crop, into the bank. */
export const fillMemoryBank = <E>(
  model: SwavModel,
  bank: MemoryBank,
  config: RunConfig,
  batches: Stream.Stream<Batch, E>,
) =>
  Stream.runForEach(batches, (batch) =>
    Effect.gen(function* () {
      for (const [i, crop] of config.deepclusterv2.cropsForAssign.entries()) {
        writeCrop(bank, i, batch.indices, yield* embedCrop(model, batch, config, crop));
      }
    })).pipe(Effect.tap(() => Effect.sync(() => (bank.filled = true))));

/**
 * DeepCluster-v2 as a method value: targets from the bank, cross-entropy per head, bank written after.
 *
 * @example DeepCluster-v2 through the stock pipeline: three heads of 10 prototypes, k-means at each epoch start
 * ```ts
 * import { Effect } from "effect";
 * import assert from "node:assert/strict";
 * import { decodeRunConfig, pretrain, TensorBackend, writeDemoDataset } from "@swav/swav-ts";
 *
 * const data = await Deno.makeTempDir();
 * const out = await Deno.makeTempDir();
 * await writeDemoDataset({ folder: data, perClassTrain: 4, perClassTest: 2, size: 16, seed: 1 });
 * const result = await Effect.runPromise(Effect.gen(function* () {
 *   const config = yield* decodeRunConfig({
 *     data: { source: `${data}:train` },
 *     multicrop: { nmbCrops: [2, 2], sizeCrops: [16, 8], minScaleCrops: [0.3, 0.1], maxScaleCrops: [1, 0.3] },
 *     model: { arch: "resnet18", width: 4, stem: "cifar", hidden: 32, out: 16, prototypes: [10, 10, 10] },
 *     train: { method: "deepclusterv2", epochs: 2, batchSize: 8, out, knnEvery: 0 },
 *   });
 *   return yield* pretrain(config);
 * }).pipe(Effect.provide(TensorBackend.layer("wasm"))));
 * assert.equal(result.steps, 10); // 2 epochs of 5 steps
 * assert.ok(Number.isFinite(result.lastLoss));
 * await Deno.remove(data, { recursive: true });
 * await Deno.remove(out, { recursive: true });
 * ```
 */
export const deepClusterV2Method = (config: RunConfig, state: StepState, bank: MemoryBank): Method => {
  const settings = config.deepclusterv2;
  const encode = encodeStage.apply({ training: true });
  const heads = prototypeHeads(config.model).map((head) =>
    state.model.param(head.name) as tf.Variable<tf.Rank.R2>
  );
  let lastTargets: Int32Array[] = [];
  return {
    name: "deepclusterv2",
    prepare: (input) =>
      Effect.sync(() => {
        const targets = batchTargets(bank, input.batch.indices);
        lastTargets = targets;
        return (crops) => {
          const { embeddings, features } = encode({ model: state.model, cropGroups: crops });
          const loss = clusterLoss({ embeddings, prototypes: heads, targets }, settings);
          return { loss, embeddings, codes: [], features };
        };
      }),
    update: (input, out) =>
      Effect.promise(async () => {
        writeBatch(
          bank,
          input.batch.indices,
          new Float32Array(await out.embeddings.data()),
          settings.cropsForAssign,
        );
      }),
    // The distinct targets of the first head in the batch: 1 when every sample went to one cluster.
    statistics: () =>
      Promise.resolve({ prototypesInUse: new Set(lastTargets[0]?.filter((t) => t >= 0) ?? []).size }),
    nonFiniteHint: "Try a lower optim.baseLr or a larger deepclusterv2.temperature.",
  };
};
