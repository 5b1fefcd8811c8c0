/**
 * encode stage: configured through its schema, output owned by the scope,
 * equal to the model's forward; the backend memory check before training.
 */
import * as tf from "@tensorflow/tfjs";
import assert from "node:assert/strict";
import { Effect, Exit } from "effect";
import { initBackend } from "../backend/tensor_backend.ts";
import {
  decodeModelConfig,
  disposeModel,
  estimateMemory,
  makeSwavModel,
  modelForward,
} from "../models/model.ts";
import { checkFitsBackend, encodeStage, ModelTooLarge, WASM_HEAP_BYTES } from "../stages/encode.ts";
import { configure } from "../stages/stage.ts";
import { assertNoTensorLeak, relativeError, values } from "./_helpers.ts";

await initBackend("wasm");

const smallConfig = () =>
  Effect.runPromise(
    decodeModelConfig({ arch: "resnet18", width: 4, stem: "cifar", hidden: 16, out: 8, prototypes: 10 }),
  );

Deno.test("encode stage: embeddings and scores of modelForward, unit norm, owned by the scope", async () => {
  const config = await smallConfig();
  await assertNoTensorLeak("encode", async () => {
    const model = makeSwavModel(config, 3);
    const batch = 3;
    const cropGroups = [
      tf.randomNormal([2 * batch, 16, 16, 3], 0, 1, "float32", 1) as tf.Tensor4D,
      tf.randomNormal([4 * batch, 8, 8, 3], 0, 1, "float32", 2) as tf.Tensor4D,
    ];
    // Eval mode: the stage and a direct forward see the same running statistics.
    const direct = modelForward(model, cropGroups, { training: false });
    const want = { embeddings: await values(direct.embeddings), scores: await values(direct.scores!) };
    tf.dispose(Object.values(direct));

    const got = await Effect.runPromise(Effect.scoped(
      Effect.gen(function* () {
        const encode = yield* configure(encodeStage, { training: false });
        const out = yield* encode({ model, cropGroups });
        assert.deepEqual(out.embeddings.shape, [6 * batch, 8]);
        assert.deepEqual(out.scores!.shape, [6 * batch, 10]);
        return {
          embeddings: yield* Effect.promise(() => values(out.embeddings)),
          scores: yield* Effect.promise(() => values(out.scores!)),
          // Still alive inside the scope.
          tensors: [out.embeddings, out.scores],
        };
      }),
    ));
    // Disposed when the scope closed.
    assert.ok(got.tensors.every((t) => t!.isDisposed));
    assert.ok(relativeError(got.embeddings, want.embeddings) < 1e-6);
    assert.ok(relativeError(got.scores, want.scores) < 1e-6);
    for (let row = 0; row < 6 * batch; row++) {
      const norm = Math.hypot(...got.embeddings.subarray(row * 8, (row + 1) * 8));
      assert.ok(Math.abs(norm - 1) < 1e-5, `row ${row} has norm ${norm}`);
    }

    // Train mode (the default config) updates BatchNorm running statistics.
    const before = await values(model.param("backbone.bn1.running_var"));
    await Effect.runPromise(Effect.scoped(
      Effect.flatMap(configure(encodeStage, {}), (encode) => encode({ model, cropGroups })),
    ));
    assert.ok(relativeError(await values(model.param("backbone.bn1.running_var")), before) > 1e-3);

    tf.dispose(cropGroups);
    disposeModel(model);
  });
});

Deno.test("encode stage: a bad config names the field", async () => {
  const exit = await Effect.runPromiseExit(configure(encodeStage, { training: "yes" }));
  assert.ok(Exit.isFailure(exit));
  assert.match(String(exit.cause), /training/);
});

Deno.test("checkFitsBackend: the reference ResNet-50 recipe does not fit wasm and says what to shrink", async () => {
  const config = await Effect.runPromise(decodeModelConfig({}));
  const crops = { sizeCrops: [224, 96], nmbCrops: [2, 6] };
  const exit = await Effect.runPromiseExit(checkFitsBackend(config, 256, crops, "wasm"));
  assert.ok(Exit.isFailure(exit), "batch 256 of 2x224+6x96 on ResNet-50 should not fit 4 GiB");
  const error = await Effect.runPromise(Effect.flip(checkFitsBackend(config, 256, crops, "wasm")));
  assert.ok(error instanceof ModelTooLarge);
  assert.ok(error.estimatedBytes > WASM_HEAP_BYTES);
  assert.match(error.message, /estimated \d+\.\d GiB of tensors > 4 GiB wasm heap/);
  assert.match(error.message, /reduce batchSize \(now 256\)/);
  assert.match(error.message, /sizeCrops \(now \[224,96\]/);
  assert.match(error.message, /nmbCrops \(now \[2,6\]\)/);
  assert.match(error.message, /--backend webgpu/);
  // Other backends have no limit known in advance: the estimate comes back.
  const onWebgpu = await Effect.runPromise(checkFitsBackend(config, 256, crops, "webgpu"));
  assert.equal(onWebgpu.totalBytes, error.estimatedBytes);
});

Deno.test("checkFitsBackend: a small CIFAR config fits; the limit sits between batch sizes", async () => {
  const config = await Effect.runPromise(
    decodeModelConfig({ arch: "resnet18", stem: "cifar", prototypes: 100, hidden: 512 }),
  );
  const crops = { sizeCrops: [32], nmbCrops: [2] };
  const fits = await Effect.runPromise(checkFitsBackend(config, 8, crops, "wasm"));
  assert.ok(fits.totalBytes < WASM_HEAP_BYTES);
  // Memory grows with the batch: find the first batch that fails, and check it is consistent.
  let batch = 8;
  while (estimateMemory(config, batch, crops).totalBytes <= WASM_HEAP_BYTES) batch *= 2;
  assert.ok(batch <= 4096, `ResNet-18 on 2x32 px still fits at batch ${batch}?`);
  const exit = await Effect.runPromiseExit(checkFitsBackend(config, batch, crops, "wasm"));
  assert.ok(Exit.isFailure(exit));
  const half = await Effect.runPromiseExit(checkFitsBackend(config, batch / 2, crops, "wasm"));
  assert.ok(Exit.isSuccess(half));
});
