import * as tf from "@tensorflow/tfjs";
import assert from "node:assert/strict";
import { Effect, Exit } from "effect";
import { decodeRunConfig, type RunConfig } from "../config/config.ts";
import { writeDemoDataset } from "../data/demo_dataset.ts";
import { epochOrder } from "../data/loader.ts";
import { readNpy } from "../data/npy.ts";
import { openSource } from "../data/sources.ts";
import { disposeModel, makeSwavModel, readModelArrays } from "../models/model.ts";
import { writeCheckpoint } from "../pipelines/checkpoint.ts";
import { evaluate, evaluationJson } from "../pipelines/evaluate.ts";
import { extractToFolder } from "../pipelines/extract_folder.ts";
import { extractFeatures } from "../pipelines/extract.ts";
import { knnClassify } from "../pipelines/knn.ts";
import { probeLearningRate, trainLinearProbe } from "../pipelines/linear_probe.ts";
import { rngFor } from "../data/rng.ts";
import { liveTensors } from "../backend/resources.ts";
import { assertNoTensorLeak, relativeError, useBackend } from "./_helpers.ts";

await useBackend("wasm");

const gaussian = (rng: { next(): number }) =>
  Math.sqrt(-2 * Math.log(1 - rng.next())) * Math.cos(2 * Math.PI * rng.next());

/** Float64 reference of the probe: softmax cross-entropy, torch SGD (momentum, wd, nesterov), cosine per epoch. */
const referenceProbe = (
  x: Float64Array,
  labels: Int32Array,
  n: number,
  d: number,
  c: number,
  init: { weight: Float32Array; bias: Float32Array },
  o: {
    epochs: number;
    batchSize: number;
    lr: number;
    momentum: number;
    weightDecay: number;
    nesterov: boolean;
  },
  seed: number,
) => {
  const w = Float64Array.from(init.weight);
  const b = Float64Array.from(init.bias);
  const mw = new Float64Array(w.length);
  const mb = new Float64Array(c);
  for (let epoch = 0; epoch < o.epochs; epoch++) {
    const lr = 0 + (o.lr - 0) * (1 + Math.cos((Math.PI * epoch) / o.epochs)) / 2;
    const order = [...epochOrder(n, seed, epoch)];
    for (let start = 0; start < n; start += o.batchSize) {
      const rows = order.slice(start, start + o.batchSize);
      const gw = new Float64Array(w.length);
      const gb = new Float64Array(c);
      for (const i of rows) {
        const logits = new Float64Array(c);
        for (let k = 0; k < c; k++) {
          logits[k] = b[k]!;
          for (let j = 0; j < d; j++) logits[k] += x[i * d + j]! * w[j * c + k]!;
        }
        const max = Math.max(...logits);
        const e = logits.map((v) => Math.exp(v - max));
        const sum = e.reduce((a, v) => a + v, 0);
        for (let k = 0; k < c; k++) {
          const g = (e[k]! / sum - (labels[i] === k ? 1 : 0)) / rows.length;
          gb[k] += g;
          for (let j = 0; j < d; j++) gw[j * c + k] += x[i * d + j]! * g;
        }
      }
      const step = (p: Float64Array, m: Float64Array, g: Float64Array) => {
        for (let q = 0; q < p.length; q++) {
          const dq = g[q]! + o.weightDecay * p[q]!;
          m[q] = o.momentum * m[q]! + dq;
          p[q] -= lr * (o.nesterov ? dq + o.momentum * m[q]! : m[q]!);
        }
      };
      step(w, mw, gw);
      step(b, mb, gb);
    }
  }
  return { w, b };
};

Deno.test("linear probe: two epochs equal a float64 torch-SGD reference (momentum, wd, cosine, nesterov)", async (t) => {
  for (const nesterov of [false, true]) {
    await t.step(`nesterov ${nesterov}`, async () => {
      const rng = rngFor(Math.floor(Math.random() * 1e9), 5);
      const [n, d, c] = [37, 6, 4];
      const x = Float32Array.from({ length: n * d }, () => gaussian(rng));
      const labels = Int32Array.from({ length: n }, () => Math.floor(rng.next() * c));
      const init = {
        weight: Float32Array.from({ length: d * c }, () => 0.1 * gaussian(rng)),
        bias: Float32Array.from({ length: c }, () => 0.1 * gaussian(rng)),
      };
      const o = { epochs: 2, batchSize: 8, lr: 0.3, momentum: 0.9, weightDecay: 1e-2, nesterov };
      const result = await assertNoTensorLeak("probe", async () => {
        const features = tf.tensor2d(x, [n, d]);
        try {
          return await Effect.runPromise(trainLinearProbe(features, labels, features, labels, {
            ...o,
            finalLr: 0,
            numClasses: c,
            seed: 11,
            init,
          }));
        } finally {
          features.dispose();
        }
      });
      const ref = referenceProbe(Float64Array.from(x), labels, n, d, c, init, o, 11);
      // 10 SGD steps in float32 vs float64: relative error a few 1e-7; 1e-5 leaves room.
      assert.ok(
        relativeError(result.weight, ref.w) < 1e-5,
        `weight error ${relativeError(result.weight, ref.w)}`,
      );
      assert.ok(relativeError(result.bias, ref.b) < 1e-5, `bias error ${relativeError(result.bias, ref.b)}`);
      assert.equal(result.history.length, 2);
      assert.equal(result.history[1]!.lr, probeLearningRate(1, { lr: 0.3, finalLr: 0, epochs: 2 }));
    });
  }
});

Deno.test("linear probe: separable features reach high accuracy; confusion rows sum to class counts", async () => {
  const rng = rngFor(Math.floor(Math.random() * 1e9), 6);
  const [d, c] = [16, 5];
  const centres = Array.from({ length: c }, () => Array.from({ length: d }, () => 3 * gaussian(rng)));
  const make = (n: number) => {
    const labels = Int32Array.from({ length: n }, (_, i) => i % c);
    const x = new Float32Array(n * d);
    labels.forEach((label, i) => {
      for (let j = 0; j < d; j++) x[i * d + j] = centres[label]![j]! + 0.5 * gaussian(rng);
    });
    return { x, labels };
  };
  const train = make(400);
  const test = make(153); // not a multiple of the classes: unequal class counts
  const result = await assertNoTensorLeak("probe", async () => {
    const a = tf.tensor2d(train.x, [400, d]);
    const b = tf.tensor2d(test.x, [153, d]);
    try {
      return await Effect.runPromise(trainLinearProbe(a, train.labels, b, test.labels, {
        numClasses: c,
        epochs: 10,
        batchSize: 64,
        lr: 0.3,
        finalLr: 0,
        momentum: 0.9,
        weightDecay: 1e-6,
        nesterov: false,
        seed: 1,
        chunkSize: 50,
      }));
    } finally {
      tf.dispose([a, b]);
    }
  });
  assert.ok(result.top1 >= 0.95, `best top-1 ${result.top1}`);
  assert.ok(result.lastTop1 <= result.top1);
  assert.equal(result.top1, Math.max(...result.history.map((h) => h.top1)));
  assert.equal(result.history[result.bestEpoch - 1]!.top1, result.top1);
  assert.ok(result.history.at(-1)!.loss < result.history[0]!.loss, "training loss falls");
  const counts = new Array(c).fill(0);
  test.labels.forEach((l) => counts[l]++);
  assert.deepEqual(result.confusion.map((row) => row.reduce((s, v) => s + v, 0)), counts);
  result.perClassAccuracy.forEach((acc, k) => assert.equal(acc, result.confusion[k]![k]! / counts[k]));
  const diagonal = result.confusion.reduce((s, row, k) => s + row[k]!, 0);
  assert.equal(diagonal / 153, result.top1);
});

// --- End to end on a checkpoint ----------------------------------------------------------------

const data = await Deno.makeTempDir({ prefix: "swav-eval-test-" });
await writeDemoDataset({ folder: `${data}/demo`, perClassTrain: 6, perClassTest: 3, size: 16, seed: 4 });
await Deno.mkdir(`${data}/flat`);
for (const name of ["0000.png", "0001.png"]) {
  await Deno.copyFile(`${data}/demo/test/disc/${name}`, `${data}/flat/${name}`);
}

const tinyConfig = async (model: object = {}): Promise<RunConfig> =>
  await Effect.runPromise(decodeRunConfig({
    data: { source: `${data}/demo:train`, workers: 0 },
    multicrop: { nmbCrops: [2], sizeCrops: [16], minScaleCrops: [0.3], maxScaleCrops: [1], blur: false },
    model: { arch: "resnet18", width: 4, stem: "cifar", hidden: 16, out: 8, prototypes: 20, ...model },
    train: { knnK: 5 },
  }, "test"));

/** A run folder with one checkpoint of a seeded model (its BatchNorm statistics made non-trivial). */
const writeRun = async (folder: string, config: RunConfig, arraysFrom?: RunConfig) => {
  const model = makeSwavModel((arraysFrom ?? config).model, 9);
  try {
    for (const p of model.params) {
      if (p.name.endsWith("running_var")) {
        tf.tidy(() => p.variable.assign(tf.randomUniform(p.variable.shape, 0.5, 2)));
      }
      if (p.name.endsWith("running_mean")) {
        tf.tidy(() => p.variable.assign(tf.randomNormal(p.variable.shape, 0, 0.1)));
      }
    }
    await Deno.writeTextFile(`${folder}/config.json`, JSON.stringify(config));
    await Effect.runPromise(writeCheckpoint(folder, {
      step: 12,
      epoch: 1,
      batchInEpoch: 0,
      config,
      extra: {},
      arrays: await Effect.runPromise(readModelArrays(model)),
    }));
    return { model, dispose: () => disposeModel(model) };
  } catch (error) {
    disposeModel(model);
    throw error;
  }
};

Deno.test("evaluate: kNN on a run folder equals extract + knnClassify; linear probe; extract to .npy", async (t) => {
  const run = await Deno.makeTempDir({ prefix: "swav-eval-run-" });
  const config = await tinyConfig();
  const { model, dispose } = await writeRun(run, config);
  try {
    await t.step("kNN by run folder, default sources", async () => {
      const phases = new Set<string>();
      const result = await assertNoTensorLeak("evaluate", () =>
        Effect.runPromise(evaluate({
          checkpoint: run,
          method: "knn",
          batchSize: 7,
          chunkSize: 4,
          onProgress: (phase) => phases.add(phase),
        })));
      assert.equal(result.method, "knn");
      assert.deepEqual([...phases], ["train features", "test features"]);
      assert.equal(result.trainSamples, 60);
      assert.equal(result.testSamples, 30);
      assert.equal(result.k, 5);
      // An image folder: Resize(int(16 x 256 / 224) = 18) before CenterCrop(16), as the reference's 256 -> 224.
      assert.equal(result.resize, 18);
      assert.match(result.checkpoint, /checkpoint-000000012\.swav$/);
      // The same model, extracted and classified directly.
      const direct = await Effect.runPromise(Effect.gen(function* () {
        const options = {
          size: 16,
          resize: 18,
          mean: config.multicrop.mean,
          std: config.multicrop.std,
          workers: 0,
        };
        const a = yield* extractFeatures(model, yield* openSource(`${data}/demo:train`), options);
        const b = yield* extractFeatures(model, yield* openSource(`${data}/demo:test`), options);
        const r = yield* knnClassify(a.features, a.labels, b.features, b.labels, {
          k: 5,
          temperature: 0.1,
          numClasses: 10,
        });
        tf.dispose([a.features, b.features]);
        return r;
      }));
      assert.equal(result.top1, direct.top1);
      assert.equal(result.top5, direct.top5);
      assert.deepEqual(result.confusion.map((row) => row.reduce((s, v) => s + v, 0)), new Array(10).fill(3));
      const json = evaluationJson(result);
      assert.equal(json["method"], "knn");
      assert.ok((json["top1"] as number) >= 0 && (json["top1"] as number) <= 1);
    });

    await t.step("linear probe on the checkpoint file, explicit sources", async () => {
      const result = await assertNoTensorLeak("evaluate", () =>
        Effect.runPromise(evaluate({
          checkpoint: `${run}/checkpoint-000000012.swav`,
          train: `${data}/demo:train`,
          test: `${data}/demo:test`,
          method: "linear",
          protocol: "features",
          epochs: 3,
          probeBatchSize: 16,
        })));
      assert.equal(result.method, "linear");
      if (result.method !== "linear") return;
      assert.equal(result.protocol, "features");
      assert.equal(result.history.length, 3);
      assert.ok(result.lastTop1 <= result.top1);
      const json = evaluationJson(result);
      assert.equal(json["last_top1"], result.lastTop1);
      assert.equal(json["best_epoch"], result.bestEpoch);
      assert.equal(json["protocol"], "features");
    });

    await t.step("linear, paper protocol (the default on an image folder), both RegLogs", async () => {
      for (const variant of [{}, { pooling: "avgpool" as const, batchNorm: true }]) {
        const epochs: number[] = [];
        const live: number[] = [];
        const result = await assertNoTensorLeak("evaluate paper", () =>
          Effect.runPromise(evaluate({
            checkpoint: run,
            method: "linear",
            epochs: 3,
            probeBatchSize: 16,
            onProbeEpoch: (report) => {
              epochs.push(report.epoch);
              live.push(liveTensors().tensors);
            },
            ...variant,
          })));
        // No tensor accumulates from one epoch to the next.
        assert.equal(new Set(live).size, 1, `live tensors per epoch ${live}`);
        assert.equal(result.method, "linear");
        if (result.method !== "linear") return;
        assert.equal(result.protocol, "paper");
        assert.equal(result.pooling, variant.pooling ?? "global");
        assert.deepEqual(epochs, [1, 2, 3]);
        assert.equal(result.history.length, 3);
        assert.ok(result.lastTop1 <= result.top1);
        assert.deepEqual(
          result.confusion.map((row) => row.reduce((s, v) => s + v, 0)),
          new Array(10).fill(3),
        );
        const json = evaluationJson(result);
        assert.equal(json["protocol"], "paper");
        assert.equal(json["resize"], 18);
      }
    });

    await t.step("semisup on 50% of the labels leaves the checkpoint file unchanged", async () => {
      const file = `${run}/checkpoint-000000012.swav`;
      const before = await Deno.readFile(file);
      const live: number[] = [];
      const result = await assertNoTensorLeak("evaluate semisup", () =>
        Effect.runPromise(evaluate({
          checkpoint: run,
          method: "semisup",
          labels: "50%",
          epochs: 3,
          probeBatchSize: 8,
          onProbeEpoch: () => live.push(liveTensors().tensors),
        })));
      assert.equal(new Set(live).size, 1, `live tensors per epoch ${live}`);
      assert.equal(result.method, "semisup");
      if (result.method !== "semisup") return;
      // 6 train images per class: round(0.5 x 6) = 3 of each of the 10 classes.
      assert.equal(result.subsetSamples, 30);
      assert.equal(result.history.length, 3);
      assert.deepEqual(await Deno.readFile(file), before);
      const json = evaluationJson(result);
      assert.equal(json["method"], "semisup");
      assert.equal(json["subset_samples"], 30);
    });

    await t.step("extract writes features.npy, labels.npy and a sidecar", async () => {
      const out = `${run}/features`;
      const sidecar = await assertNoTensorLeak(
        "extract",
        () => Effect.runPromise(extractToFolder({ checkpoint: run, data: `${data}/demo:test`, out })),
      );
      const features = await Effect.runPromise(readNpy(`${out}/features.npy`));
      const labels = await Effect.runPromise(readNpy(`${out}/labels.npy`));
      assert.equal(features.dtype, "<f4");
      assert.deepEqual([...features.shape], [30, model.plan.featureDim]);
      assert.equal(labels.dtype, "<i8");
      assert.deepEqual(
        Array.from(labels.values as BigInt64Array, Number),
        [...Array(30).keys()].map((i) => Math.floor(i / 3)),
      );
      const json = JSON.parse(await Deno.readTextFile(`${out}/features.json`));
      assert.deepEqual(json, JSON.parse(JSON.stringify(sidecar)));
      assert.equal(json.classes.length, 10);
      // The same test-time transform as evaluate's: Resize(18) + CenterCrop(16) on an image folder.
      assert.equal(json.resize, 18);
      const direct = await Effect.runPromise(
        extractFeatures(model, await Effect.runPromise(openSource(`${data}/demo:test`)), {
          size: 16,
          resize: 18,
          mean: config.multicrop.mean,
          std: config.multicrop.std,
          batchSize: 256,
        }),
      );
      const values = await direct.features.data();
      direct.features.dispose();
      assert.deepEqual(Array.from(features.values as Float32Array), Array.from(values));
    });
  } finally {
    dispose();
    await Deno.remove(run, { recursive: true });
  }
});

Deno.test("evaluate: clear tagged errors", async (t) => {
  const run = await Deno.makeTempDir({ prefix: "swav-eval-run-" });
  const failure = async (options: Parameters<typeof evaluate>[0]) => {
    const exit = await Effect.runPromiseExit(evaluate(options));
    assert.ok(Exit.isFailure(exit), "should fail");
    const error = exit.cause.reasons.map((r) => (r as { error?: unknown }).error).find((e) =>
      e !== undefined
    );
    return error as { _tag: string; message: string };
  };
  try {
    await t.step("PATH that does not exist", async () => {
      const e = await failure({ checkpoint: `${run}/nope`, method: "knn" });
      assert.equal(e._tag, "CheckpointError");
      assert.match(e.message, /nope: no such file or folder/);
    });
    await t.step("a folder without checkpoints", async () => {
      const e = await failure({ checkpoint: run, method: "knn" });
      assert.match(e.message, /holds no checkpoint/);
    });
    const config = await tinyConfig();
    const { dispose } = await writeRun(run, config);
    dispose();
    await t.step("an unlabelled test source", async () => {
      const e = await failure({ checkpoint: run, test: `${data}/flat`, method: "knn" });
      assert.equal(e._tag, "EvaluationError");
      assert.match(e.message, /test source .*flat is unlabelled/);
    });
    await t.step("a checkpoint whose arrays are of another architecture", async () => {
      const other = await Deno.makeTempDir({ prefix: "swav-eval-run-" });
      try {
        const { dispose } = await writeRun(other, await tinyConfig({ width: 8 }), config);
        dispose();
        const e = await failure({ checkpoint: other, method: "knn" });
        assert.equal(e._tag, "EvaluationError");
        assert.match(e.message, /another architecture/);
        assert.ok(!e.message.includes("\n"), "one line");
      } finally {
        await Deno.remove(other, { recursive: true });
      }
    });
  } finally {
    await Deno.remove(run, { recursive: true });
  }
});

globalThis.addEventListener("unload", () => Deno.removeSync(data, { recursive: true }));

Deno.test("eval/extract/export CLI: --json line, .npy output, an export evaluates like its checkpoint, one-line errors", async () => {
  const folder = await Deno.makeTempDir({ prefix: "swav-eval-cli-" });
  const run = `${folder}/run`;
  await Deno.mkdir(run);
  const { dispose } = await writeRun(run, await tinyConfig());
  dispose();
  // cli/main.ts wires these commands in; a runner of our own keeps this test independent of it.
  const commands = new URL("../cli/eval_commands.ts", import.meta.url).href;
  await Deno.writeTextFile(
    `${folder}/runner.ts`,
    [
      `import { NodeRuntime, NodeServices } from "@effect/platform-node";`,
      `import { Effect } from "effect";`,
      `import { Command } from "effect/cli";`,
      `import { evalCommand, exportCommand, extractCommand } from "${commands}";`,
      `Command.make("swav").pipe(Command.withSubcommands([evalCommand, extractCommand, exportCommand]),`,
      `  Command.run({ version: "0" }), Effect.provide(NodeServices.layer), NodeRuntime.runMain);`,
    ].join("\n"),
  );
  const swav = async (...args: string[]) => {
    const output = await new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        "--allow-all",
        `--config=${new URL("../deno.json", import.meta.url).pathname}`,
        `${folder}/runner.ts`,
        ...args,
      ],
      env: { NO_COLOR: "1", SWAV_BACKEND: "wasm" },
      stdout: "piped",
      stderr: "piped",
    }).output();
    const text = (b: Uint8Array) => new TextDecoder().decode(b);
    return { code: output.code, stdout: text(output.stdout), stderr: text(output.stderr) };
  };
  try {
    const knn = await swav("eval", "--checkpoint", run, "--method", "knn", "--json", "--workers", "0");
    assert.equal(knn.code, 0, knn.stderr);
    const line = JSON.parse(knn.stdout.trim().split("\n").at(-1)!);
    assert.equal(line.method, "knn");
    assert.ok(line.top1 >= 0 && line.top1 <= 1 && line.top5 >= line.top1);
    assert.match(knn.stderr, /test features 30\/30/);

    const exported = await swav("export", "--checkpoint", run, "--out", `${folder}/encoder`);
    assert.equal(exported.code, 0, exported.stderr);
    const viaExport = await swav(
      "eval",
      "--checkpoint",
      `${folder}/encoder`,
      "--train",
      `${data}/demo:train`,
      "--test",
      `${data}/demo:test`,
      "--method",
      "knn",
      "--k",
      "5",
      "--json",
    );
    assert.equal(viaExport.code, 0, viaExport.stderr);
    const exportLine = JSON.parse(viaExport.stdout.trim().split("\n").at(-1)!);
    assert.equal(exportLine.top1, line.top1);
    assert.equal(exportLine.top5, line.top5);

    const extracted = await swav(
      "extract",
      "--checkpoint",
      run,
      "--data",
      `${data}/demo:test`,
      "--out",
      `${folder}/f`,
    );
    assert.equal(extracted.code, 0, extracted.stderr);
    assert.deepEqual([...(await Effect.runPromise(readNpy(`${folder}/f/features.npy`))).shape], [30, 32]);

    const missing = await swav("eval", "--checkpoint", `${folder}/nothing`, "--method", "linear");
    assert.equal(missing.code, 1);
    assert.match(missing.stderr, /^error: CheckpointError: checkpoint .*nothing: no such file or folder\n$/m);
    const unlabelled = await swav("eval", "--checkpoint", run, "--test", `${data}/flat`);
    assert.equal(unlabelled.code, 1);
    assert.match(unlabelled.stderr, /error: EvaluationError: the test source .*flat is unlabelled/);
    // Flags of another method, or a value the flag cannot take: one line, before any work.
    for (
      const [args, line] of [
        [["--resize", "big"], /^error: EvalFlagError: --resize big: give auto, none or a size in pixels\n$/],
        [
          ["--method", "knn", "--labels", "1%"],
          /^error: EvalFlagError: --labels applies to --method semisup\n$/,
        ],
        [
          ["--method", "linear", "--protocol", "features", "--bn"],
          /^error: EvalFlagError: --pooling and --bn apply to --method linear --protocol paper\n$/,
        ],
      ] as const
    ) {
      const bad = await swav("eval", "--checkpoint", run, ...args);
      assert.equal(bad.code, 1);
      assert.match(bad.stderr, line);
    }
    const small = await swav("eval", "--checkpoint", run, "--resize", "8", "--workers", "0");
    assert.equal(small.code, 1);
    assert.match(small.stderr, /error: EvaluationError: --resize 8 is smaller than the crop size 16/);
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
});
