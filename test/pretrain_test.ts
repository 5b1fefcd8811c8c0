import * as tf from "@tensorflow/tfjs";
import assert from "node:assert/strict";
import { Effect, Exit } from "effect";
import { TensorBackend } from "../backend/tensor_backend.ts";
import { decodeRunConfig, type RunConfig, type RunConfigInput } from "../config/config.ts";
import { writeDemoDataset } from "../data/demo_dataset.ts";
import { latestCheckpoint, readCheckpoint } from "../pipelines/checkpoint.ts";
import { pretrain, type PretrainOptions, type StepMetrics } from "../pipelines/pretrain.ts";
import { SwappedLossConfig, swappedLossStage } from "../stages/swapped_loss.ts";
import { tensorStage } from "../stages/stage.ts";
import { useBackend } from "./_helpers.ts";

/** A tiny labelled image-folder data set (10 classes of 16 px PNGs), written once per test run. */
const dataFolder = await Deno.makeTempDir({ prefix: "swav-pretrain-test-" });
await writeDemoDataset({ folder: dataFolder, perClassTrain: 12, perClassTest: 4, size: 16, seed: 1 });
globalThis.addEventListener("unload", () => Deno.removeSync(dataFolder, { recursive: true }));

/** A model and crops small enough for a step in well under a second on wasm. */
const tinyConfig = (
  out: string,
  overrides: { swav?: object; train?: object; optim?: object } = {},
): RunConfigInput => ({
  data: { source: `${dataFolder}:train`, workers: 0 },
  multicrop: {
    nmbCrops: [2, 2],
    sizeCrops: [16, 8],
    minScaleCrops: [0.3, 0.1],
    maxScaleCrops: [1, 0.3],
    blur: false,
  },
  model: { arch: "resnet18", width: 4, stem: "cifar", hidden: 32, out: 16, prototypes: 30 },
  swav: { freezePrototypesIters: 5, queueLength: 0, ...overrides.swav },
  optim: { baseLr: 0.3, finalLr: 0.003, warmupEpochs: 0, ...overrides.optim },
  train: { epochs: 2, batchSize: 16, out, seed: 3, ...overrides.train },
});

const run = (config: RunConfig, options: PretrainOptions = {}) =>
  Effect.runPromiseExit(pretrain(config, options).pipe(Effect.provide(TensorBackend.layer("wasm"))));

const decode = (input: RunConfigInput) => Effect.runPromise(decodeRunConfig(input, "test"));

const withRunFolder = async (body: (out: string) => Promise<void>) => {
  const out = await Deno.makeTempDir({ prefix: "swav-run-" });
  try {
    await body(out);
  } finally {
    await Deno.remove(out, { recursive: true });
  }
};

Deno.test("training loss falls within a few hundred steps and the codes do not collapse", async () => {
  await withRunFolder(async (out) => {
    const metrics: StepMetrics[] = [];
    // 120 images, batch 16: 7 steps per epoch, 28 epochs ≈ 200 steps.
    const config = await decode(tinyConfig(out, { train: { epochs: 28 } }));
    const exit = await run(config, { hooks: { onStep: (m) => metrics.push(m) } });
    assert.ok(Exit.isSuccess(exit), String(Exit.isFailure(exit) ? exit.cause : ""));
    const mean = (xs: StepMetrics[]) => xs.reduce((s, m) => s + m.loss, 0) / xs.length;
    const first = mean(metrics.slice(0, 10));
    const last = mean(metrics.slice(-10));
    assert.ok(
      last < first - 0.3,
      `loss should fall: first 10 steps ${first.toFixed(3)}, last 10 ${last.toFixed(3)}`,
    );
    // More prototypes in use than there are classes (10): not collapsed onto a few.
    const inUse = metrics.slice(-10).map((m) => m.prototypes_in_use);
    assert.ok(Math.min(...inUse.map(Number)) > 10, `prototypes in use at the end: ${inUse}`);
    // metrics.jsonl holds one parseable line per step with the documented fields.
    const lines = (await Deno.readTextFile(`${out}/metrics.jsonl`)).trim().split("\n").map((l) =>
      JSON.parse(l)
    );
    assert.equal(lines.length, metrics.length);
    for (const key of ["epoch", "step", "loss", "lr", "images_per_s", "code_entropy", "prototypes_in_use"]) {
      assert.ok(key in lines[0], `metrics.jsonl lacks ${key}`);
    }
    // The resolved config is in the run folder with every default filled in.
    const resolved = JSON.parse(await Deno.readTextFile(`${out}/config.json`));
    assert.equal(resolved.swav.temperature, 0.1);
    assert.equal(resolved.train.batchSize, 16);
  });
});

Deno.test("resume continues exactly: 2N steps straight equal N steps + resume + N steps", async () => {
  // N = 5 spans an epoch boundary (7 steps per epoch), the prototype freeze (5) and a queue that fills (2 batches).
  const n = 5;
  const overrides = { swav: { queueLength: 32, queueStartEpoch: 0 }, train: { epochs: 3 } };
  const weights = async (out: string) => {
    const checkpoint = await Effect.runPromise(
      readCheckpoint((await Effect.runPromise(latestCheckpoint(out)))!),
    );
    return checkpoint;
  };
  await withRunFolder(async (straight) => {
    await withRunFolder(async (resumed) => {
      const a = await run(
        await decode(tinyConfig(straight, { ...overrides, train: { ...overrides.train, maxSteps: 2 * n } })),
      );
      assert.ok(Exit.isSuccess(a), String(Exit.isFailure(a) ? a.cause : ""));
      const b1 = await run(
        await decode(tinyConfig(resumed, { ...overrides, train: { ...overrides.train, maxSteps: n } })),
      );
      assert.ok(Exit.isSuccess(b1));
      const b2 = await run(
        await decode(tinyConfig(resumed, { ...overrides, train: { ...overrides.train, maxSteps: 2 * n } })),
        { resume: true },
      );
      assert.ok(Exit.isSuccess(b2), String(Exit.isFailure(b2) ? b2.cause : ""));
      const x = await weights(straight);
      const y = await weights(resumed);
      assert.equal(x.step, 2 * n);
      assert.equal(y.step, 2 * n);
      const byName = new Map(y.arrays.map((arr) => [arr.name, arr]));
      assert.ok(x.arrays.some((arr) => arr.name.startsWith("optimiser/")), "optimiser slots are saved");
      assert.ok(x.arrays.some((arr) => arr.name.startsWith("queue/")), "the queue is saved");
      for (const arr of x.arrays) {
        const other = byName.get(arr.name);
        assert.ok(other !== undefined, `resumed run lacks ${arr.name}`);
        let worst = 0;
        arr.values.forEach((v, i) => (worst = Math.max(worst, Math.abs(v - other.values[i]!))));
        // Same computation in the same order on the same backend and threads: bit for bit (a kernel
        // that reads memory another thread or call overwrites shows here, as oneDNN's did: onednn_test.ts).
        assert.ok(worst === 0, `${arr.name} differs by ${worst}`);
      }
    });
  });
});

Deno.test("a non-finite loss stops the run before the update; the last checkpoint stays loadable", async () => {
  await withRunFolder(async (out) => {
    const config = await decode(tinyConfig(out, { train: { checkpointEvery: 1 } }));
    let calls = 0;
    // A loss stage that turns NaN on the third step, as an overflowing exp would.
    const nanOnThird = tensorStage({
      name: "nanOnThird",
      config: SwappedLossConfig,
      apply: (c: SwappedLossConfig) => {
        const loss = swappedLossStage.apply(c);
        return (
          input: Parameters<typeof loss>[0],
        ) => (++calls === 3 ? loss(input).mul(Number.NaN) as tf.Scalar : loss(input));
      },
    });
    const exit = await run(config, { stages: { loss: nanOnThird } });
    assert.ok(Exit.isFailure(exit), "the run must fail");
    assert.match(String(exit.cause), /NonFiniteLoss/);
    assert.match(String(exit.cause), /the update was not applied/);
    const latest = await Effect.runPromise(latestCheckpoint(out));
    const checkpoint = await Effect.runPromise(readCheckpoint(latest!));
    assert.equal(checkpoint.step, 2);
    assert.ok(checkpoint.arrays.every((a) => a.values.every(Number.isFinite)));
  });
});

Deno.test("the live tensor count stays flat across many steps and returns to its start", async () => {
  await withRunFolder(async (out) => {
    const before = tf.memory().numTensors;
    const counts: number[] = [];
    const config = await decode(
      tinyConfig(out, { swav: { queueLength: 32, queueStartEpoch: 1 }, train: { epochs: 4 } }),
    );
    const exit = await run(config, { hooks: { onStep: () => counts.push(tf.memory().numTensors) } });
    assert.ok(Exit.isSuccess(exit), String(Exit.isFailure(exit) ? exit.cause : ""));
    // One-time allocations happen early: the prototypes' momentum slot once they unfreeze (step 6),
    // the queue at epoch 2 (step 8) and its first use once full (step 10). After that: flat.
    const steady = counts.slice(12);
    assert.ok(steady.length >= 10, `too few steps: ${counts.length}`);
    assert.ok(steady.every((c) => c === steady[0]), `tensor count drifts: ${counts}`);
    assert.equal(tf.memory().numTensors, before, "the run's scope releases every tensor");
  });
});

Deno.test("bad config fields get messages naming the field and the allowed values", async () => {
  const cases: [unknown, RegExp][] = [
    [{ train: { batchSize: 0 } }, /train.*batchSize|batchSize/],
    [{ model: { arch: "vgg16" } }, /"resnet18" \| "resnet34" \| "resnet50"[\s\S]*arch/],
    [{ train: { backend: "cuda" } }, /backend/],
    [{ multicrop: { nmbCrops: [2], sizeCrops: [32, 16] } }, /sizeCrops has 2 entries but nmbCrops has 1/],
    [{ swav: { epsilon: 0 } }, /greater than 0[\s\S]*epsilon/],
    [{ trian: { epochs: 1 } }, /excess property[\s\S]*trian/],
  ];
  for (const [raw, pattern] of cases) {
    const exit = await Effect.runPromiseExit(decodeRunConfig(raw, "my.json"));
    assert.ok(Exit.isFailure(exit), `${JSON.stringify(raw)} should fail`);
    assert.match(String(exit.cause), pattern);
    assert.match(String(exit.cause), /my\.json/);
  }
});

Deno.test("a custom pipeline (hard codes instead of Sinkhorn) runs through the stock pretrain", async () => {
  const { hardAssignStage } = await import("../examples/custom_pipeline.ts");
  await withRunFolder(async (out) => {
    const metrics: StepMetrics[] = [];
    const config = await decode(tinyConfig(out, { train: { maxSteps: 4 } }));
    const exit = await run(config, {
      stages: { assign: hardAssignStage },
      hooks: { onStep: (m) => metrics.push(m) },
    });
    assert.ok(Exit.isSuccess(exit), String(Exit.isFailure(exit) ? exit.cause : ""));
    assert.equal(metrics.length, 4);
    // Hard codes are one-hot: their entropy is zero, unlike Sinkhorn's.
    assert.ok(
      metrics.every((m) => Math.abs(m.code_entropy!) < 1e-4),
      `entropies ${metrics.map((m) => m.code_entropy)}`,
    );
  });
});

Deno.test("the optional kNN check runs at epoch ends on the labelled splits and leaves training unchanged", async () => {
  const losses = (knnEvery: number) => {
    const seen: number[] = [];
    const reports: { epoch: number; knnTop1?: number }[] = [];
    return withRunFolder(async (out) => {
      const config = await decode(tinyConfig(out, { train: { epochs: 2, knnEvery, knnK: 5 } }));
      const exit = await run(config, {
        hooks: { onStep: (m) => seen.push(m.loss), onEpoch: (r) => reports.push(r) },
      });
      assert.ok(Exit.isSuccess(exit), String(Exit.isFailure(exit) ? exit.cause : ""));
    }).then(() => ({ seen, reports }));
  };
  const withKnn = await losses(1);
  assert.equal(withKnn.reports.length, 2);
  for (const { epoch, knnTop1 } of withKnn.reports) {
    assert.ok(knnTop1 !== undefined && knnTop1 >= 0 && knnTop1 <= 1, `epoch ${epoch}: kNN top-1 ${knnTop1}`);
  }
  // The kNN reads the backbone in eval mode between epochs: the steps after it (epoch 2) are those of a
  // run without it, bit for bit, so a run with knnEvery stands for the same run without.
  const without = await losses(0);
  assert.ok(without.reports.every((r) => r.knnTop1 === undefined));
  assert.deepEqual(withKnn.seen, without.seen);
});

Deno.test("the online probe: test top-1 per epoch in epochs.jsonl, SwAV losses unchanged, tensor count flat", async () => {
  await useBackend("wasm");
  const losses = async (onlineProbe: boolean) => {
    const seen: number[] = [];
    const counts: number[] = [];
    const lines: { epoch: number; knn_top1?: number; online_probe_top1?: number }[] = [];
    const before = tf.memory().numTensors;
    await withRunFolder(async (out) => {
      const config = await decode(
        tinyConfig(out, { train: { epochs: 4, knnEvery: 2, knnK: 5, onlineProbe } }),
      );
      const exit = await run(config, {
        hooks: {
          onStep: (m) => {
            seen.push(m.loss);
            counts.push(tf.memory().numTensors);
          },
        },
      });
      assert.ok(Exit.isSuccess(exit), String(Exit.isFailure(exit) ? exit.cause : ""));
      const text = await Deno.readTextFile(`${out}/epochs.jsonl`);
      lines.push(...text.trim().split("\n").map((l) => JSON.parse(l)));
    });
    // (The first run of the file leaves the backend's one-time allocations: checked on the second.)
    if (onlineProbe) {
      assert.equal(tf.memory().numTensors, before, "the run's scope releases the probe's tensors");
    }
    return { seen, counts, lines };
  };
  const without = await losses(false);
  const withProbe = await losses(true);
  // The probe reads the features as constants: the SwAV losses are those of a run without it, bit for bit.
  assert.deepEqual(withProbe.seen, without.seen);
  assert.equal(withProbe.lines.length, 4);
  for (const line of withProbe.lines) {
    const top1 = line.online_probe_top1;
    assert.ok(top1 !== undefined && top1 >= 0 && top1 <= 1, `epoch ${line.epoch}: online probe ${top1}`);
    assert.equal(line.knn_top1 !== undefined, line.epoch % 2 === 0, `epoch ${line.epoch}: kNN only when due`);
  }
  assert.ok(without.lines.every((l) => l.online_probe_top1 === undefined));
  // Only DeepCluster-v2 has an epoch start to time: a SwAV epoch records its seconds, no fill or k-means.
  for (const line of [...without.lines, ...withProbe.lines] as Record<string, unknown>[]) {
    assert.ok(typeof line.seconds === "number" && line.seconds >= 0, JSON.stringify(line));
    assert.ok(!("fill_seconds" in line) && !("kmeans_seconds" in line), JSON.stringify(line));
  }
  // After the prototypes unfreeze (step 6) every step holds the same number of tensors.
  const steady = withProbe.counts.slice(8);
  assert.ok(steady.every((c) => c === steady[0]), `tensor count drifts: ${withProbe.counts}`);
});
