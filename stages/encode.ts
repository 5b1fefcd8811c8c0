/**
 * encode stage: crops grouped by resolution -> unit-norm embeddings and
 * prototype scores. The backbone runs once per resolution group (BatchNorm
 * statistics per group), the projection head and prototypes once on all crops
 * together, as SwAV's `ResNet.forward` does.
 *
 * Gradients: the stage is plain tensor maths, so it can run inside a gradient
 * tape together with the loss (`tf.variableGrads`). In train mode it updates the
 * BatchNorm running statistics (non-trainable variables, never on the loss's path).
 *
 * Also here: the check, before the first step, that a configuration's tensors fit
 * the backend (the wasm heap is 32-bit: at most 4 GiB).
 */
import type { Tensor2D, Tensor4D } from "../backend/tensor_types.ts";
import { Effect, Schema, type Scope } from "effect";
import { scoped } from "../backend/resources.ts";
import {
  type CropSpec,
  estimateMemory,
  type MemoryEstimate,
  type ModelConfig,
  modelForward,
  type SwavModel,
} from "../models/model.ts";
import { defineTensorStage, type TensorStage } from "./stage.ts";

/** A validated encode config. */
export interface EncodeConfig {
  /** Train mode (default true): BatchNorm on batch statistics, running statistics updated. False: eval mode. */
  readonly training: boolean;
}

/** The encode stage's config schema. */
export const EncodeConfig: Schema.Codec<EncodeConfig, Partial<EncodeConfig>> = Schema.Struct({
  /** Train mode: BatchNorm on batch statistics, running statistics updated. False: eval mode. */
  training: Schema.Boolean.pipe(Schema.withDecodingDefaultKey(Effect.succeed(true))),
});

/** What the encode stage takes: the model and the batch's crops, grouped by resolution. */
export interface EncodeInput {
  /** The model whose backbone, head and prototypes run. */
  readonly model: SwavModel;
  /** Crop-major concatenations of the crops of one resolution, [crops·batch, H, W, C] each, in crop order. */
  readonly cropGroups: readonly Tensor4D[];
}

/** What the encode stage gives: the embeddings, the prototype scores and (for `apply`) the pooled features. */
export interface EncodeOutput {
  /** L2-normalised embeddings z [N, out], rows crop-major: `[bs·v, bs·(v+1))` is crop v. */
  readonly embeddings: Tensor2D;
  /** Prototype scores z·Cᵀ [N, K] of a single-head model (SwAV's); undefined for other heads. */
  readonly scores: Tensor2D | undefined;
  /** Pooled backbone features [N, F] (`apply` only; an online probe reads them as constants). */
  readonly features?: Tensor2D;
}

/**
 * encode stage. `apply` is the form for a gradient tape (the backbone's features
 * stay alive until the tape's scope ends: the backward pass may need them);
 * `run`'s output tensors are owned by the caller's scope.
 *
 * @example Embeddings and prototype scores of a batch of two crops at one resolution
 * ```ts
 * import * as tf from "@tensorflow/tfjs";
 * import { Effect, Schema } from "effect";
 * import assert from "node:assert/strict";
 * import { configure, encodeStage, initBackend, makeSwavModel, ModelConfig } from "@swav/swav-ts";
 *
 * await initBackend("cpu");
 * using model = makeSwavModel(
 *   Schema.decodeUnknownSync(ModelConfig)({ arch: "resnet18", width: 4, stem: "cifar", hidden: 0, out: 8, prototypes: 5 }),
 * );
 * const shapes = await Effect.runPromise(Effect.scoped(Effect.gen(function* () {
 *   const encode = yield* configure(encodeStage, { training: false });
 *   const crops = tf.randomUniform<tf.Rank.R4>([2 * 3, 16, 16, 3]); // 2 crops of 3 images, crop-major
 *   const { embeddings, scores } = yield* encode({ model, cropGroups: [crops] });
 *   crops.dispose();
 *   return [embeddings.shape, scores?.shape];
 * })));
 * assert.deepEqual(shapes, [[6, 8], [6, 5]]); // unit-norm embeddings, scores against the 5 prototypes
 * ```
 */
export const encodeStage: TensorStage<EncodeInput, EncodeOutput, EncodeConfig, never, Scope.Scope> =
  defineTensorStage<EncodeInput, EncodeOutput, EncodeConfig, never, Scope.Scope>({
    name: "encode",
    config: EncodeConfig,
    apply: (config) => (input) => {
      const { embeddings, scores, features } = modelForward(input.model, input.cropGroups, {
        training: config.training,
      });
      return { embeddings, scores, features };
    },
    run: (config) => (input) =>
      scoped(() => {
        const { embeddings, scores, features } = modelForward(input.model, input.cropGroups, {
          training: config.training,
        });
        features.dispose();
        return { embeddings, scores };
      }),
  });

/** Bytes addressable by the wasm backend: its heap is a 32-bit wasm memory. */
export const WASM_HEAP_BYTES = 4 * 1024 ** 3;

/** A configuration whose tensors would not fit the backend's memory. */
export class ModelTooLarge extends Schema.TaggedError<ModelTooLarge>()("ModelTooLarge", {
  backend: Schema.String,
  estimatedBytes: Schema.Number,
  limitBytes: Schema.Number,
  message: Schema.String,
}) {}

const gib = (bytes: number): string => `${(bytes / 1024 ** 3).toFixed(1)} GiB`;

/**
 * Fails with `ModelTooLarge` when the estimated tensor memory of one training
 * step exceeds what `backendName` can hold; succeeds with the estimate. Only the
 * wasm backend has a hard limit known in advance (4 GiB); for the others the
 * estimate is returned unchecked.
 */
export const checkFitsBackend = (
  config: ModelConfig,
  batchSize: number,
  crops: CropSpec,
  backendName: string,
): Effect.Effect<MemoryEstimate, ModelTooLarge> =>
  Effect.suspend(() => {
    const estimate = estimateMemory(config, batchSize, crops);
    if (backendName !== "wasm" || estimate.totalBytes <= WASM_HEAP_BYTES) return Effect.succeed(estimate);
    const largest = Math.max(...crops.sizeCrops);
    return Effect.fail(
      new ModelTooLarge({
        backend: backendName,
        estimatedBytes: estimate.totalBytes,
        limitBytes: WASM_HEAP_BYTES,
        message:
          `estimated ${gib(estimate.totalBytes)} of tensors > ${WASM_HEAP_BYTES / 1024 ** 3} GiB wasm heap ` +
          `(${gib(estimate.activationBytes)} activations, ${gib(estimate.parameterBytes)} parameters and ` +
          `optimiser state): reduce batchSize (now ${batchSize}) or sizeCrops (now [${crops.sizeCrops}], ` +
          `largest ${largest}) / nmbCrops (now [${crops.nmbCrops}]), or the model (arch ${config.arch}, ` +
          `width ${config.width}, hidden ${config.hidden}, prototypes ${config.prototypes}), ` +
          `or use --backend webgpu`,
      }),
    );
  });
