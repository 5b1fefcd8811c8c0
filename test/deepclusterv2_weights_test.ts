/**
 * Official DeepCluster-v2 checkpoints in and out: a `.pth` in main_deepclusterv2.py's layout (`module.`
 * prefix, `projection_head.*`, `prototypes.prototypes{h}.weight` [K_h, D]), made by
 * reference/deepclusterv2_checkpoint_reference.py with torch, loads whole: the backbone's features, the
 * embeddings and every head's scores match torch's float64 eval-mode forward (norm-wise relative error
 * < 1e-4, our float32 against torch's float64 on the same float32 weights); `export --head` as
 * safetensors writes every head under the official names with the file's values, bit for bit; a file
 * missing a head is one line.
 */
import * as tf from "@tensorflow/tfjs";
import assert from "node:assert/strict";
import { Effect, Exit } from "effect";
import { initBackend } from "../backend/tensor_backend.ts";
import { readTorchStateDict } from "../data/torch_checkpoint.ts";
import { modelForward, readModelArrays, scopedSwavModel } from "../models/model.ts";
import { decodeModelConfig } from "../models/model.ts";
import { exportCheckpointEncoder } from "../pipelines/extract_folder.ts";
import {
  initFromWeightsFile,
  initNote,
  loadWeightsFile,
  scopedModelFromWeights,
} from "../pipelines/torch_weights.ts";
import { needs, PYTHON } from "./_optional.ts";
import { assertNoTensorLeak, relativeError, values } from "./_helpers.ts";

await initBackend("wasm");
const TOL = 1e-4;
const script = new URL("../reference/deepclusterv2_checkpoint_reference.py", import.meta.url).pathname;

/** The reference's files in a fresh folder. */
const makeFixture = async () => {
  const dir = await Deno.makeTempDir({ prefix: "swav-dcv2-" });
  const out = await new Deno.Command(PYTHON, { args: [script, dir], stderr: "piped" }).output();
  assert.ok(out.success, new TextDecoder().decode(out.stderr));
  const expected = JSON.parse(await Deno.readTextFile(`${dir}/deepclusterv2.json`)) as {
    heads: number[];
    input: number[];
    inputShape: [number, number, number, number];
    features: number[];
    embeddings: number[];
    scores: number[][];
  };
  return { dir, expected };
};

/** The tensors of a safetensors file (F32 only), by name. */
const readSafetensors = (bytes: Uint8Array) => {
  const length = Number(new DataView(bytes.buffer, bytes.byteOffset).getBigUint64(0, true));
  const header = JSON.parse(new TextDecoder().decode(bytes.subarray(8, 8 + length)));
  const data = bytes.slice(8 + length);
  const tensors = new Map<string, { shape: number[]; values: Float32Array }>();
  for (const [name, entry] of Object.entries(header)) {
    if (name === "__metadata__") continue;
    const { dtype, shape, data_offsets: [from, to] } = entry as {
      dtype: string;
      shape: number[];
      data_offsets: [number, number];
    };
    assert.equal(dtype, "F32");
    tensors.set(name, { shape, values: new Float32Array(data.buffer.slice(from, to)) });
  }
  return tensors;
};

Deno.test({
  name:
    "an official DeepCluster-v2 checkpoint loads whole: torch's features, embeddings and every head's scores",
  ...needs("torch"),
  fn: async () => {
    const { dir, expected } = await makeFixture();
    try {
      await assertNoTensorLeak("dcv2", () =>
        Effect.runPromise(Effect.scoped(Effect.gen(function* () {
          const weights = yield* loadWeightsFile(`${dir}/deepclusterv2.pth`);
          assert.equal(weights.hasHead, true);
          assert.deepEqual(weights.config.prototypes, expected.heads);
          assert.equal(weights.config.hidden, 16);
          assert.equal(weights.config.out, 8);
          const model = yield* scopedModelFromWeights(weights);
          const x = tf.tensor4d(expected.input, expected.inputShape);
          const out = modelForward(model, [x], { training: false });
          const features = yield* Effect.promise(() => values(out.features));
          const embeddings = yield* Effect.promise(() => values(out.embeddings));
          assert.ok(relativeError(features, expected.features) < TOL, "features");
          assert.ok(relativeError(embeddings, expected.embeddings) < TOL, "embeddings");
          // Each head's scores z · W_hᵀ with the weights as loaded.
          const arrays = yield* readModelArrays(model);
          for (let h = 0; h < expected.heads.length; h++) {
            const w = arrays.find((a) => a.name === `prototypes.prototypes${h}.weight`)!;
            const scores = tf.tidy(() =>
              tf.matMul(out.embeddings, tf.tensor2d(w.values, [w.shape[0]!, w.shape[1]!]), false, true)
            );
            const error = relativeError(yield* Effect.promise(() => values(scores)), expected.scores[h]!);
            scores.dispose();
            assert.ok(error < TOL, `head ${h} scores: relative error ${error}`);
          }
          tf.dispose([x, out.features, out.embeddings, out.scores]);
        }))));
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test({
  name:
    "export --head writes the projection head and every prototype head under the official names, bit for bit",
  ...needs("torch"),
  fn: async () => {
    const { dir } = await makeFixture();
    try {
      const file = `${dir}/deepclusterv2.pth`;
      await Effect.runPromise(
        exportCheckpointEncoder(file, `${dir}/out.safetensors`, undefined, {
          format: "safetensors",
          head: true,
        }),
      );
      const exported = readSafetensors(await Deno.readFile(`${dir}/out.safetensors`));
      const original = await Effect.runPromise(readTorchStateDict(file));
      let heads = 0;
      for (const [key, tensor] of original.tensors) {
        const name = key.slice("module.".length);
        if (name.endsWith("num_batches_tracked")) continue;
        const got = exported.get(name);
        assert.ok(got !== undefined, `${name} is exported`);
        assert.deepEqual(got.shape, [...tensor.shape], name);
        assert.deepEqual(got.values, Float32Array.from(tensor.values), `${name}: the file's values exactly`);
        if (name.startsWith("prototypes.") || name.startsWith("projection_head.")) heads++;
      }
      assert.equal(heads, 8 + 3, "the projection head's 8 tensors and 3 prototype heads");

      // pretrain --init: a DeepCluster-v2 run's model of the same shape takes every head as it is.
      const initialised = await Effect.runPromise(Effect.scoped(Effect.gen(function* () {
        const config = yield* decodeModelConfig({
          arch: "resnet18",
          width: 2,
          stem: "imagenet",
          hidden: 16,
          out: 8,
          prototypes: [10, 12, 14],
        });
        const model = yield* scopedSwavModel(config, 5);
        yield* initFromWeightsFile(model, file);
        return yield* readModelArrays(model);
      })));
      for (let h = 0; h < 3; h++) {
        const name = `prototypes.prototypes${h}.weight`;
        const ours = initialised.find((a) => a.name === name)!;
        assert.deepEqual(ours.values, exported.get(name)!.values, `--init: ${name}`);
      }
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test({
  name: "a DeepCluster-v2 checkpoint missing a head is one line naming it, never a random head",
  ...needs("torch"),
  fn: async () => {
    const { dir } = await makeFixture();
    try {
      const exit = await Effect.runPromiseExit(loadWeightsFile(`${dir}/deepclusterv2_gap.pth`));
      assert.ok(Exit.isFailure(exit));
      assert.match(String(exit.cause), /has 2 prototype heads but no prototypes\.prototypes1\.weight/);
      const exported = await Effect.runPromiseExit(
        exportCheckpointEncoder(`${dir}/deepclusterv2_gap.pth`, `${dir}/gap.safetensors`, undefined, {
          format: "safetensors",
          head: true,
        }),
      );
      assert.ok(Exit.isFailure(exported));
      await assert.rejects(Deno.stat(`${dir}/gap.safetensors`), Deno.errors.NotFound);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test("pretrain --init from a backbone-only file says that the head starts from random values", async () => {
  const fixture = new URL("./fixtures/torch/resnet18_backbone.pt", import.meta.url).pathname;
  const withHead = new URL("./fixtures/torch/resnet18.pth", import.meta.url).pathname;
  const init = (file: string) =>
    Effect.runPromise(Effect.scoped(Effect.gen(function* () {
      const weights = yield* loadWeightsFile(withHead);
      const model = yield* scopedSwavModel(weights.config, 5);
      return yield* initFromWeightsFile(model, file);
    })));
  const [backbone, whole] = [await init(fixture), await init(withHead)];
  assert.equal(backbone.hasHead, false);
  assert.equal(whole.hasHead, true);
  assert.match(initNote(fixture, backbone), /the backbone only .*start from random values/);
  assert.equal(initNote(withHead, whole), `weights initialised from ${withHead}`);
});
