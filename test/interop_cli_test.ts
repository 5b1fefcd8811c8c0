/**
 * The PyTorch interop as a user reaches it, through the CLI: `export --format
 * safetensors|onnx` from a PyTorch checkpoint (the committed fixtures of
 * reference/torch_checkpoint_reference.py), and `pretrain --init FILE.pth`
 * starting a fresh run from the file's weights.
 */
import assert from "node:assert/strict";
import { Effect } from "effect";
import { writeDemoDataset } from "../data/demo_dataset.ts";
import { latestCheckpoint, readCheckpoint } from "../pipelines/checkpoint.ts";
import { loadWeightsFile } from "../pipelines/torch_weights.ts";
import { relativeError, runCli } from "./_helpers.ts";
import { optionalStep, PYTHON } from "./_optional.ts";

const fixture = new URL("./fixtures/torch/resnet18.pth", import.meta.url).pathname;

const swav = (...args: string[]) => runCli(args);

Deno.test("export --format safetensors and --format onnx --head from a PyTorch checkpoint", async (t) => {
  const folder = await Deno.makeTempDir();
  try {
    const safetensors = await swav(
      "export",
      "--checkpoint",
      fixture,
      "--format",
      "safetensors",
      "--out",
      `${folder}/m.safetensors`,
    );
    assert.equal(safetensors.code, 0, safetensors.stderr);
    const bytes = await Deno.readFile(`${folder}/m.safetensors`);
    const headerLength = Number(new DataView(bytes.buffer).getBigUint64(0, true));
    const header = JSON.parse(new TextDecoder().decode(bytes.subarray(8, 8 + headerLength)));
    // Backbone only by default, under torchvision's names and layout ([out, in, kh, kw]).
    const weights = await Effect.runPromise(loadWeightsFile(fixture));
    const conv1 = weights.arrays.find((a) => a.name === "backbone.conv1.weight")!;
    const [kh, kw, ci, co] = conv1.shape;
    assert.deepEqual(header["conv1.weight"].shape, [co, ci, kh, kw]);
    assert.equal(header["conv1.weight"].dtype, "F32");
    assert.ok(!Object.keys(header).some((k) => k.startsWith("prototypes")), "no head unless asked");

    const onnx = await swav(
      "export",
      "--checkpoint",
      fixture,
      "--format",
      "onnx",
      "--head",
      "--out",
      `${folder}/m.onnx`,
    );
    assert.equal(onnx.code, 0, onnx.stderr);
    await optionalStep(t, "onnx.checker accepts the ONNX file", ["onnx"], async () => {
      const check = await new Deno.Command(PYTHON, {
        args: [
          "-c",
          "import onnx,sys; m=onnx.load(sys.argv[1]); onnx.checker.check_model(m, full_check=True); " +
          "print(','.join(o.name for o in m.graph.output))",
          `${folder}/m.onnx`,
        ],
        stdout: "piped",
        stderr: "piped",
      }).output();
      assert.equal(check.code, 0, new TextDecoder().decode(check.stderr));
      assert.equal(new TextDecoder().decode(check.stdout).trim(), "features,embeddings,scores");
    });
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
});

Deno.test("pretrain --init FILE.pth starts a fresh run from the file's weights", async () => {
  const folder = await Deno.makeTempDir();
  try {
    await writeDemoDataset({
      folder: `${folder}/data`,
      perClassTrain: 2,
      perClassTest: 1,
      size: 32,
      seed: 3,
    });
    const weights = await Effect.runPromise(loadWeightsFile(fixture));
    await Deno.writeTextFile(
      `${folder}/run.json`,
      JSON.stringify({
        data: { source: `${folder}/data:train`, workers: 0 },
        multicrop: { nmbCrops: [2], sizeCrops: [32], minScaleCrops: [0.3], maxScaleCrops: [1], blur: false },
        model: weights.config,
        swav: { queueLength: 0 },
        train: { epochs: 1, batchSize: 8, maxSteps: 1, seed: 5 },
      }),
    );
    const run = await swav(
      "pretrain",
      "--config",
      `${folder}/run.json`,
      "--init",
      fixture,
      "--out",
      `${folder}/run`,
    );
    assert.equal(run.code, 0, run.stderr);
    assert.match(run.stdout + run.stderr, /weights initialised from/);
    const path = await Effect.runPromise(latestCheckpoint(`${folder}/run`));
    const checkpoint = await Effect.runPromise(readCheckpoint(path!));
    // One LARC step moves a weight by at most lr x trust of its norm: the file's weights, nearly unchanged.
    for (
      const name of ["backbone.conv1.weight", "backbone.layer4.1.conv2.weight", "projection_head.0.weight"]
    ) {
      const saved = checkpoint.arrays.find((a) => a.name === name)!;
      const given = weights.arrays.find((a) => a.name === name)!;
      assert.ok(relativeError(saved.values, given.values) < 1e-2, `${name} did not come from the file`);
    }
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
});
