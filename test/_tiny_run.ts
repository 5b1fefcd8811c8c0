/** A tiny finished run for the report tests: 10-class 16 px PNG folder, two epochs with the kNN check. */
import { Effect, Exit } from "effect";
import { TensorBackend } from "../backend/tensor_backend.ts";
import { decodeRunConfig, type RunConfigInput } from "../config/config.ts";
import { writeDemoDataset } from "../data/demo_dataset.ts";
import { pretrain, type PretrainOptions } from "../pipelines/pretrain.ts";

export const tinyRunConfig = (
  data: string,
  out: string,
  train: object = {},
  model: object = {},
): RunConfigInput => ({
  data: { source: `${data}:train`, workers: 0 },
  multicrop: {
    nmbCrops: [2, 2],
    sizeCrops: [16, 8],
    minScaleCrops: [0.3, 0.1],
    maxScaleCrops: [1, 0.3],
    blur: false,
  },
  model: { arch: "resnet18", width: 4, stem: "cifar", hidden: 32, out: 16, prototypes: 30, ...model },
  swav: { freezePrototypesIters: 5, queueLength: 0 },
  optim: { baseLr: 0.3, finalLr: 0.003, warmupEpochs: 0 },
  train: { epochs: 2, batchSize: 16, out, seed: 3, knnEvery: 1, knnK: 10, ...train },
});

export const writeTinyData = async () => {
  const data = await Deno.makeTempDir({ prefix: "swav-report-data-" });
  await writeDemoDataset({ folder: data, perClassTrain: 12, perClassTest: 4, size: 16, seed: 1 });
  return data;
};

/** Trains the tiny run into `out` (wasm backend). */
export const tinyRun = async (
  data: string,
  out: string,
  train: object = {},
  options: PretrainOptions = {},
) => {
  const config = await Effect.runPromise(decodeRunConfig(tinyRunConfig(data, out, train), "test"));
  const exit = await Effect.runPromiseExit(
    pretrain(config, options).pipe(Effect.provide(TensorBackend.layer("wasm"))),
  );
  if (Exit.isFailure(exit)) throw new Error(`tiny run failed: ${exit.cause}`);
};

/** A tiny run's config file: queue from epoch 2 (full after its first step), 4 steps an epoch. */
export const writeParallelConfig = async (data: string, dir: string, train: object = {}) => {
  const config = tinyRunConfig(data, `${dir}/unused`, { knnEvery: 0, ...train });
  const path = `${dir}/config.json`;
  await Deno.writeTextFile(
    path,
    JSON.stringify({ ...config, swav: { freezePrototypesIters: 2, queueLength: 16, queueStartEpoch: 1 } }),
  );
  return path;
};

export const readMetrics = async (folder: string) =>
  (await Deno.readTextFile(`${folder}/metrics.jsonl`)).trim().split("\n").map((line) =>
    JSON.parse(line) as { step: number; loss: number; code_entropy: number; prototypes_in_use: number }
  );
