/**
 * SimCLR as a method of the generic step: encode every crop, NT-Xent over the
 * unit-norm embeddings (stages/nt_xent.ts); no prototypes, no targets, no state.
 *
 * Its collapse signal is the embeddings' spread (`embeddingStd`): the mean over
 * dimensions of the batch's standard deviation, about 1/√D for embeddings
 * spread over the sphere and 0 when they collapse to one point.
 *
 * Data parallel, every rank's embeddings are gathered (pipelines/data_parallel_methods.ts), so
 * each anchor has every image of the global batch as candidates, and the gradient flows back
 * through the gather: 2 ranks with B/2 images each train as one process with B.
 */
import { Effect } from "effect";
import { currentCommunicator } from "../backend/communicator.ts";
import type { Tensor4D } from "../backend/tensor_types.ts";
import type { RunConfig } from "../config/config.ts";
import { encodeStage } from "../stages/encode.ts";
import { ntXent } from "../stages/nt_xent.ts";
import { embeddingStdOverRanks, gatheredRows } from "./data_parallel_methods.ts";
import type { Method, StepState } from "./train_step.ts";

export { embeddingStd } from "./data_parallel_methods.ts";

/**
 * SimCLR as a method value.
 *
 * @example SimCLR through the stock pipeline: `train.method` picks the method
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
 *     model: { arch: "resnet18", width: 4, stem: "cifar", hidden: 32, out: 16, prototypes: [] }, // no prototypes
 *     train: { method: "simclr", epochs: 1, batchSize: 8, out, knnEvery: 0 },
 *   });
 *   return yield* pretrain(config);
 * }).pipe(Effect.provide(TensorBackend.layer("wasm"))));
 * assert.equal(result.steps, 5);
 * assert.ok(Number.isFinite(result.lastLoss));
 * await Deno.remove(data, { recursive: true });
 * await Deno.remove(out, { recursive: true });
 * ```
 */
export const simclrMethod = (config: RunConfig, state: StepState, batchSize: number): Method => {
  const encode = encodeStage.apply({ training: true });
  const crops = config.multicrop.nmbCrops.reduce((a, b) => a + b, 0);
  return {
    name: "simclr",
    // The job's communicator from the step's context: with several ranks the candidates are every rank's.
    prepare: () =>
      Effect.map(currentCommunicator, (comm) => (cropGroups: readonly Tensor4D[]) => {
        const { embeddings, features } = encode({ model: state.model, cropGroups });
        const loss = ntXent(
          { embeddings, batchSize, gathered: gatheredRows(embeddings, crops, comm) },
          config.simclr,
        );
        return { loss, embeddings, codes: [], features };
      }),
    update: () => Effect.void,
    statistics: async (out, comm) => ({
      embeddingStd: await embeddingStdOverRanks(out.embeddings, comm),
    }),
    nonFiniteHint: "Try a lower optim.baseLr or a larger simclr.temperature.",
  };
};
