/**
 * The GPU path stays working: the same training step on `webgpu` (Mesa's
 * software adapter on CPU machines, a real GPU elsewhere) gives the loss and
 * gradients the `wasm` backend gives.
 */
import * as tf from "@tensorflow/tfjs";
import assert from "node:assert/strict";
import { optionalTest } from "./_optional.ts";
import { initBackend, probeWebGpu } from "../backend/tensor_backend.ts";
import type { ModelConfig } from "../models/model.ts";
import { makeSwavModel, trainableVariables } from "../models/model.ts";
import { normalisePrototypes } from "../models/prototypes.ts";
import { PROTOTYPES_WEIGHT } from "../models/head.ts";
import { forwardBackward, swavTape } from "../pipelines/swav_step.ts";
import { decodeRunConfig } from "../config/config.ts";
import { Effect } from "effect";
import { relativeError } from "./_helpers.ts";

const modelConfig: ModelConfig = {
  arch: "resnet18",
  width: 4,
  inputChannels: 3,
  stem: "cifar",
  hidden: 16,
  out: 8,
  prototypes: 12,
  syncBatchNorm: true,
};

/** Loss and flattened gradients of one step on the active backend, for fixed inputs. */
const oneStep = async (crops: Float32Array[], batch: number) => {
  const config = await Effect.runPromise(decodeRunConfig({
    multicrop: { nmbCrops: [2, 2], sizeCrops: [8, 4], minScaleCrops: [0.3, 0.1], maxScaleCrops: [1, 0.3] },
    model: modelConfig,
  }));
  const model = makeSwavModel(modelConfig, 11);
  normalisePrototypes(model.param(PROTOTYPES_WEIGHT) as tf.Variable<tf.Rank.R2>);
  const groups = [tf.tensor4d(crops[0]!, [2 * batch, 8, 8, 3]), tf.tensor4d(crops[1]!, [2 * batch, 4, 4, 3])];
  const tape = forwardBackward(swavTape(model, config, batch), groups, trainableVariables(model));
  const loss = (await tape.loss.data())[0]!;
  const grads: number[] = [];
  for (const v of trainableVariables(model)) grads.push(...(await tape.grads[v.name]!.data()));
  tf.dispose([tape.loss, tape.embeddings, ...tape.codes, ...Object.values(tape.grads), ...groups]);
  for (const p of model.params) p.variable.dispose();
  return { loss, grads: Float64Array.from(grads) };
};

// Mesa's software adapter (mesa-vulkan-drivers, libvulkan1) on CPU machines, a real GPU elsewhere.
optionalTest("the training step on webgpu matches wasm (loss and gradients)", ["webgpu"], async () => {
  const adapter = await probeWebGpu();
  assert.ok(adapter !== null, "a Vulkan driver is installed but navigator.gpu found no adapter");
  const batch = 4;
  const crops = [
    Float32Array.from({ length: 2 * batch * 8 * 8 * 3 }, () => Math.random() * 2 - 1),
    Float32Array.from({ length: 2 * batch * 4 * 4 * 3 }, () => Math.random() * 2 - 1),
  ];
  await initBackend("wasm");
  const wasm = await oneStep(crops, batch);
  await initBackend("webgpu");
  const gpu = await oneStep(crops, batch);
  await initBackend("wasm");
  // float32 on both sides, different summation orders: 1e-4 relative on the loss, 1e-3 on the gradients.
  assert.ok(Number.isFinite(gpu.loss), `webgpu loss ${gpu.loss}`);
  assert.ok(
    Math.abs(gpu.loss - wasm.loss) <= 1e-4 * Math.abs(wasm.loss),
    `loss webgpu ${gpu.loss} vs wasm ${wasm.loss}`,
  );
  const error = relativeError(gpu.grads, wasm.grads);
  assert.ok(error < 1e-3, `gradients differ by ${error} (${adapter.description})`);
});
