import * as tf from "@tensorflow/tfjs";
import assert from "node:assert/strict";
import { Effect, Exit } from "effect";
import { decodeModelConfig, disposeModel, makeSwavModel } from "../models/model.ts";
import { backboneForward } from "../models/resnet.ts";
import { type EncoderManifest, exportEncoder, loadEncoder } from "../pipelines/export.ts";
import { assertNoTensorLeak, useBackend } from "./_helpers.ts";

await useBackend("wasm");

const input = { size: 16, mean: [0.5, 0.4, 0.3], std: [0.2, 0.25, 0.3] };

const withFolder = async (body: (folder: string) => Promise<void>) => {
  const folder = await Deno.makeTempDir({ prefix: "swav-export-" });
  try {
    await body(folder);
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
};

Deno.test("export: round trip is exact (every backbone parameter, and the forward pass)", async (t) => {
  for (const arch of ["resnet18", "resnet50"] as const) {
    await t.step(arch, () =>
      withFolder(async (folder) => {
        const config = await Effect.runPromise(
          decodeModelConfig({ arch, width: 4, stem: arch === "resnet18" ? "cifar" : "imagenet", hidden: 8 }),
        );
        const model = makeSwavModel(config, Math.floor(Math.random() * 1e6));
        try {
          // Non-trivial BatchNorm statistics, so eval mode depends on them.
          for (const p of model.params) {
            if (p.name.endsWith("running_var")) {
              tf.tidy(() => p.variable.assign(tf.randomUniform(p.variable.shape, 0.5, 2)));
            }
          }
          await Effect.runPromise(exportEncoder(model, folder, input));
          await assertNoTensorLeak("load", () =>
            Effect.runPromise(Effect.scoped(Effect.gen(function* () {
              const { model: encoder, input: got } = yield* loadEncoder(folder);
              assert.deepEqual(got, { ...input, channels: 3 });
              assert.deepEqual(encoder.config, config);
              const backbone = model.params.filter((p) => p.name.startsWith("backbone."));
              assert.deepEqual(encoder.params.map((p) => p.name), backbone.map((p) => p.name));
              for (const p of backbone) {
                const a = yield* Effect.promise(() => p.variable.data());
                const b = yield* Effect.promise(() => encoder.param(p.name).data());
                assert.deepEqual(Array.from(b), Array.from(a), p.name);
              }
              assert.throws(() => encoder.param("projection_head.0.weight"), /no parameter/);
              const x = tf.randomNormal([2, 16, 16, 3]) as tf.Tensor4D;
              const [y1, y2] = [model, encoder].map((m) =>
                backboneForward(m.plan, m.param, x, { training: false })
              );
              const [v1, v2] = yield* Effect.promise(() => Promise.all([y1!.data(), y2!.data()]));
              assert.deepEqual(Array.from(v2), Array.from(v1));
              tf.dispose([x, y1!, y2!]);
            }))));
          // TF.js itself reads the weights with the manifest as written.
          const manifest: EncoderManifest = JSON.parse(await Deno.readTextFile(`${folder}/model.json`));
          const bytes = await Deno.readFile(`${folder}/weights.bin`);
          const decoded = tf.io.decodeWeights(bytes.buffer, manifest.weightsManifest[0]!.weights);
          const name = "backbone.layer1.0.conv1.weight";
          assert.deepEqual(
            Array.from(await decoded[name]!.data()),
            Array.from(await model.param(name).data()),
          );
          tf.dispose(Object.values(decoded));
        } finally {
          disposeModel(model);
        }
      }));
  }
});

Deno.test("export: broken folders fail with EncoderError naming the problem", async (t) => {
  await withFolder(async (folder) => {
    const config = await Effect.runPromise(decodeModelConfig({ arch: "resnet18", width: 4, stem: "cifar" }));
    const model = makeSwavModel(config, 1);
    await Effect.runPromise(exportEncoder(model, folder, input));
    disposeModel(model);
    const load = async () => {
      const exit = await Effect.runPromiseExit(Effect.scoped(loadEncoder(folder)));
      assert.ok(Exit.isFailure(exit));
      return String(exit.cause);
    };
    const manifestText = await Deno.readTextFile(`${folder}/model.json`);
    const weights = await Deno.readFile(`${folder}/weights.bin`);
    await t.step("truncated weights", async () => {
      await Deno.writeFile(`${folder}/weights.bin`, weights.subarray(0, weights.length - 8));
      assert.match(await load(), /EncoderError.*weights file too short/s);
      await Deno.writeFile(`${folder}/weights.bin`, weights);
    });
    await t.step("another architecture", async () => {
      const manifest = JSON.parse(manifestText);
      manifest.model.width = 8;
      await Deno.writeTextFile(`${folder}/model.json`, JSON.stringify(manifest));
      assert.match(await load(), /has shape .* needs/);
    });
    await t.step("not an export", async () => {
      await Deno.writeTextFile(`${folder}/model.json`, JSON.stringify({ format: "tfjs-layers" }));
      assert.match(await load(), /not a swav-ts-encoder export/);
      await Deno.remove(`${folder}/model.json`);
      assert.match(await load(), /no model\.json/);
    });
  });
});

Deno.test("export: weight paths stay inside the folder, only regular files are read, sizes checked first", async (t) => {
  await withFolder(async (root) => {
    const folder = `${root}/a/b/export`;
    const config = await Effect.runPromise(decodeModelConfig({ arch: "resnet18", width: 4, stem: "cifar" }));
    const model = makeSwavModel(config, 1);
    await Effect.runPromise(exportEncoder(model, folder, input));
    disposeModel(model);
    const manifestText = await Deno.readTextFile(`${folder}/model.json`);
    const withPaths = (paths: string[]) => {
      const manifest = JSON.parse(manifestText);
      manifest.weightsManifest[0].paths = paths;
      return Deno.writeTextFile(`${folder}/model.json`, JSON.stringify(manifest));
    };
    const load = async () => {
      const exit = await Effect.runPromiseExit(Effect.scoped(loadEncoder(folder)));
      assert.ok(Exit.isFailure(exit), "loaded");
      return String(exit.cause);
    };
    await t.step("../ out of the folder", async () => {
      await withPaths(["../../../../../../../../../../etc/passwd"]);
      assert.match(await load(), /EncoderError.*leaves its folder/s);
    });
    await t.step("an absolute path", async () => {
      await withPaths(["/etc/passwd"]);
      assert.match(await load(), /EncoderError.*leaves its folder/s);
    });
    await t.step("a symlink pointing out", async () => {
      await Deno.symlink("/etc/passwd", `${folder}/link.bin`);
      await withPaths(["link.bin"]);
      assert.match(await load(), /EncoderError.*outside the folder/s);
    });
    await t.step("a folder named like a weights file", async () => {
      await Deno.mkdir(`${folder}/dir.bin`);
      await withPaths(["dir.bin"]);
      assert.match(await load(), /EncoderError.*not a regular file/s);
    });
    await t.step("a declared size far past the file", async () => {
      const manifest = JSON.parse(manifestText);
      manifest.weightsManifest[0].weights[0].shape = [1 << 20, 1 << 12];
      await Deno.writeTextFile(`${folder}/model.json`, JSON.stringify(manifest));
      assert.match(await load(), /EncoderError.*(more than 4 GiB|too short)/s);
    });
    await t.step("a fractional shape", async () => {
      const manifest = JSON.parse(manifestText);
      manifest.weightsManifest[0].weights[0].shape = [1.5, 2];
      await Deno.writeTextFile(`${folder}/model.json`, JSON.stringify(manifest));
      assert.match(await load(), /EncoderError.*shape/s);
    });
    await Deno.writeTextFile(`${folder}/model.json`, manifestText);
    await Effect.runPromise(Effect.scoped(loadEncoder(folder)));
  });
});
