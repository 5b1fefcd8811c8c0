/**
 * PyTorch interop: checkpoints written by torch.save (reference/torch_checkpoint_reference.py ->
 * test/fixtures/torch/) load into our model and give torch's outputs; hostile files are typed
 * errors with nothing executed and nothing huge allocated.
 *
 * Tolerance: norm-wise relative error < 1e-4 (our float32 eval-mode forward against torch's
 * float64 forward on the same float32 weights).
 */
import * as tf from "@tensorflow/tfjs";
import assert from "node:assert/strict";
import { Effect } from "effect";
import { initBackend } from "../backend/tensor_backend.ts";
import { modelForward } from "../models/model.ts";
import { fromTorchLayout, toTorchLayout } from "../models/torch_names.ts";
import { readTorchStateDict } from "../data/torch_checkpoint.ts";
import {
  isTorchCheckpointFile,
  loadTorchForEvaluation,
  loadWeightsFile,
  scopedModelFromWeights,
} from "../pipelines/torch_weights.ts";
import { assertNoTensorLeak, relativeError, values } from "./_helpers.ts";

await initBackend("wasm");

const TOL = 1e-4;
const dir = new URL("./fixtures/torch/", import.meta.url).pathname;
interface Expected {
  readonly config: Record<string, unknown>;
  readonly input: number[];
  readonly inputShape: [number, number, number, number];
  readonly features: number[];
  readonly scores: number[];
}
const expected: Record<string, Expected> = JSON.parse(await Deno.readTextFile(`${dir}expected.json`));

/** Our eval-mode features and scores for a fixture's input, with the model the file makes. */
const forward = (file: string, input: Expected) =>
  Effect.runPromise(Effect.scoped(Effect.gen(function* () {
    const weights = yield* loadWeightsFile(file);
    const model = yield* scopedModelFromWeights(weights);
    const x = tf.tensor4d(input.input, input.inputShape);
    const out = modelForward(model, [x], { training: false });
    const result = {
      config: weights.config,
      hasHead: weights.hasHead,
      features: yield* Effect.promise(() => values(out.features)),
      scores: yield* Effect.promise(() => values(out.scores!)),
    };
    tf.dispose([x, out.features, out.scores, out.embeddings]);
    return result;
  })));

for (const name of ["resnet18", "resnet50"]) {
  Deno.test(`a main_swav checkpoint (${name}, module. prefix, in a dict) gives torch's features and scores`, async () => {
    const e = expected[name]!;
    await assertNoTensorLeak(name, async () => {
      const ours = await forward(`${dir}${name}.pth`, e);
      assert.equal(ours.hasHead, true);
      assert.deepEqual(
        { ...ours.config },
        {
          arch: e.config.arch,
          width: 2,
          inputChannels: 3,
          stem: "imagenet",
          hidden: 16,
          out: 8,
          prototypes: 10,
          syncBatchNorm: true,
        },
      );
      const featureError = relativeError(ours.features, e.features);
      const scoreError = relativeError(ours.scores, e.scores);
      assert.ok(featureError < TOL, `${name} features: relative error ${featureError}`);
      assert.ok(scoreError < TOL, `${name} scores: relative error ${scoreError}`);
    });
  });
}

Deno.test("a legacy-format checkpoint (pre-1.6) loads like the zip one", async () => {
  const zip = await Effect.runPromise(readTorchStateDict(`${dir}resnet18.pth`));
  const legacy = await Effect.runPromise(readTorchStateDict(`${dir}resnet18_legacy.pth`));
  assert.deepEqual([...legacy.tensors.keys()], [...zip.tensors.keys()]);
  for (const [key, t] of zip.tensors) {
    const l = legacy.tensors.get(key)!;
    assert.deepEqual(l.shape, t.shape, key);
    assert.deepEqual(l.values, t.values, key);
  }
  // num_batches_tracked is int64, read (as the reference set it) and not mapped.
  const tracked = zip.tensors.get("module.bn1.num_batches_tracked")!;
  assert.equal(tracked.dtype, "int64");
  assert.deepEqual([...tracked.values], [7]);
  assert.ok(await Effect.runPromise(isTorchCheckpointFile(`${dir}resnet18_legacy.pth`)));
  assert.ok(await Effect.runPromise(isTorchCheckpointFile(`${dir}resnet18.pth`)));
  assert.ok(!(await Effect.runPromise(isTorchCheckpointFile(dir))));
});

Deno.test("a backbone-only state dict (backbone. prefix, under model) gives the same features", async () => {
  const e = expected.resnet18!;
  await assertNoTensorLeak("backbone only", async () => {
    const ours = await forward(`${dir}resnet18_backbone.pt`, e);
    assert.equal(ours.hasHead, false);
    assert.ok(relativeError(ours.features, e.features) < TOL);
  });
});

Deno.test("eval's loader takes a .pth: model and ImageNet input transform", async () => {
  await Effect.runPromise(Effect.scoped(Effect.gen(function* () {
    const loaded = yield* loadTorchForEvaluation(`${dir}resnet50.pth`);
    assert.equal(loaded.model.plan.featureDim, 64);
    assert.equal(loaded.input.size, 224);
  })));
});

Deno.test("a config that disagrees with the file: one line naming the first key that does not fit", async () => {
  const error = await Effect.runPromise(
    Effect.flip(loadWeightsFile(`${dir}resnet18.pth`, { arch: "resnet50" })),
  );
  assert.equal(error._tag, "TorchWeightsError");
  assert.match(
    error.message,
    /module\.layer1\.0\.conv1\.weight has shape \[2,2,3,3\], a resnet50 \(width 2\) needs \[2,2,1,1\]/,
  );
  assert.ok(!error.message.includes("\n"));
  const widthError = await Effect.runPromise(
    Effect.flip(loadWeightsFile(`${dir}resnet18.pth`, { width: 4 })),
  );
  assert.match(
    widthError.message,
    /module\.conv1\.weight has shape \[2,3,7,7\], a resnet18 \(width 4\) needs \[4,3,7,7\]/,
  );
});

Deno.test("conv layouts: torch [out, in, kh, kw] <-> ours [kh, kw, in, out] round-trips", () => {
  const v = Float32Array.from({ length: 2 * 3 * 4 * 5 }, (_, i) => i);
  const ours = fromTorchLayout([2, 3, 4, 5], v);
  assert.deepEqual(ours.shape, [4, 5, 3, 2]);
  // element (o=1, i=2, y=3, x=4) of torch's layout
  assert.equal(ours.values[((3 * 5 + 4) * 3 + 2) * 2 + 1], v[((1 * 3 + 2) * 4 + 3) * 5 + 4]);
  const back = toTorchLayout(ours.shape, ours.values);
  assert.deepEqual(back.shape, [2, 3, 4, 5]);
  assert.deepEqual(back.values, v);
});

const hostile: Record<string, RegExp> = {
  "hostile_os_system.pth": /posix\.system.*not resolved.*where a tensor is needed/,
  "hostile_huge.pth": /claims 1099511627776 float32 elements, the file holds 16 bytes/,
  "hostile_outside.pth": /points outside the file/,
  "truncated.pth": /truncated/,
  "truncated_legacy.pth": /truncated/,
};

Deno.test("hostile files are typed errors: nothing executed, nothing huge allocated", async () => {
  const marker = "/tmp/swav_ts_pwned";
  await Deno.remove(marker).catch(() => {});
  const before = Deno.memoryUsage().rss;
  for (const [file, reason] of Object.entries(hostile)) {
    const error = await Effect.runPromise(Effect.flip(loadWeightsFile(`${dir}${file}`)));
    assert.equal(error._tag, "TorchCheckpointError", file);
    assert.match(error.message, reason, file);
    assert.ok(error.message.startsWith(`PyTorch checkpoint ${dir}${file}: `), error.message);
  }
  assert.ok(Deno.memoryUsage().rss - before < 256 * 2 ** 20, "no large allocation");
  await assert.rejects(Deno.stat(marker), Deno.errors.NotFound, "the pickled os.system never ran");
});

Deno.test("a zip entry named outside the archive, and a non-checkpoint, are typed errors", async () => {
  const { parseTorchStateDict } = await import("../data/torch_checkpoint.ts");
  const bytes = await Deno.readFile(`${dir}hostile_os_system.pth`);
  // Rename "archive/data.pkl" to "../chive/data.pkl" in both headers (same length).
  const text = new TextDecoder("latin1").decode(bytes).replaceAll("archive/data.pkl", "../chive/data.pk");
  const renamed = Uint8Array.from(text, (c) => c.charCodeAt(0));
  const error = await Effect.runPromise(Effect.flip(parseTorchStateDict(renamed, "renamed.pth")));
  assert.match(error.message, /points outside the archive/);
  const other = await Effect.runPromise(Effect.flip(parseTorchStateDict(new TextEncoder().encode("hello"))));
  assert.match(other.message, /neither a torch.save zip nor a legacy/);
});
