/**
 * DeepCluster-v2 and SimCLR against float64 transcriptions of the reference code
 * (reference/methods_reference.py writes test/fixtures/methods.json), and each
 * method through the stock pretrain pipeline: a flat live tensor count and an
 * exact resume.
 */
import * as tf from "@tensorflow/tfjs";
import assert from "node:assert/strict";
import { Effect, Exit } from "effect";
import { TensorBackend } from "../backend/tensor_backend.ts";
import { decodeRunConfig, type RunConfig, type RunConfigInput } from "../config/config.ts";
import { writeDemoDataset } from "../data/demo_dataset.ts";
import { latestCheckpoint, readCheckpoint } from "../pipelines/checkpoint.ts";
import { clusterMemory, startRows } from "../pipelines/deepclusterv2.ts";
import { fillProgressDue } from "../pipelines/methods.ts";
import { pretrain, type StepMetrics } from "../pipelines/pretrain.ts";
import { clusterLoss, NO_TARGET } from "../stages/cluster_loss.ts";
import { ntXent } from "../stages/nt_xent.ts";
import {
  batchTargets,
  makeMemoryBank,
  presentIds,
  rowsOf,
  writeBatch,
  writeCrop,
} from "../state/memory_bank.ts";
import { sphericalKmeans } from "../stages/kmeans.ts";
import { relativeError, useBackend } from "./_helpers.ts";

await useBackend("wasm");

interface DcCase {
  name: string;
  size: number;
  batchSize: number;
  nmbCrops: number[];
  cropsForAssign: number[];
  heads: number[];
  dim: number;
  iterations: number;
  init: { indices: number[]; crops: number[][] }[];
  starts0: number[][];
  centroids0: number[][];
  targets0: number[][];
  steps: { indices: number[]; embeddings: number[] }[];
  starts1: number[][];
  centroids1: number[][];
  targets1: number[][];
  loss: { indices: number[]; embeddings: number[]; value: number; grad: number[]; temperature: number };
}
interface SimclrCase {
  name: string;
  batchSize: number;
  crops: number;
  dim: number;
  temperature: number;
  embeddings: number[];
  value: number;
  grad: number[];
}
const fixture = JSON.parse(
  await Deno.readTextFile(new URL("./fixtures/methods.json", import.meta.url)),
) as { deepclusterv2: DcCase[]; simclr: SimclrCase[] };

// float32 sums and dot products against float64: centroids to 1e-5 (relative, norm-wise); the
// assignments exactly (no near-ties in these random inputs); the loss and its gradient to 1e-5 / 1e-4.
const CENTROID_TOL = 1e-5;

/** The injected start rows: the reference's sample ids, as positions into the bank's present ids. */
const startsFrom = (ids: Int32Array, starts: number[][]) => (head: number) =>
  Int32Array.from(starts[head]!, (id) => ids.indexOf(id));

Deno.test("DeepCluster-v2: bank fill order, k-means, targets and multi-head loss match main_deepclusterv2.py", async (t) => {
  for (const c of fixture.deepclusterv2) {
    await t.step(c.name, async () => {
      const bank = makeMemoryBank({
        size: c.size,
        dim: c.dim,
        crops: c.cropsForAssign.length,
        heads: c.heads.length,
      });
      // init_memory: one forward per assignment crop, written by sample id.
      for (const batch of c.init) {
        batch.crops.forEach((rows, i) =>
          writeCrop(bank, i, Int32Array.from(batch.indices), Float32Array.from(rows))
        );
      }
      const ids0 = presentIds(bank);
      const centroids0 = await Effect.runPromise(
        clusterMemory(bank, c.heads, c.iterations, startsFrom(ids0, c.starts0)),
      );
      c.heads.forEach((_, h) => {
        assert.deepEqual(Array.from(bank.targets[h]!), c.targets0[h], `epoch 0 targets of head ${h}`);
        assert.ok(
          relativeError(centroids0[h]!, c.centroids0[h]!) < CENTROID_TOL,
          `epoch 0 centroids of head ${h}`,
        );
      });
      assert.equal(presentIds(bank).length, 0, "clustering starts a new epoch's bank");
      // train(): each step writes its assignment crops' rows (crop-major embeddings of all crops).
      for (const step of c.steps) {
        writeBatch(bank, Int32Array.from(step.indices), Float32Array.from(step.embeddings), c.cropsForAssign);
      }
      const ids1 = presentIds(bank);
      const centroids1 = await Effect.runPromise(
        clusterMemory(bank, c.heads, c.iterations, startsFrom(ids1, c.starts1)),
      );
      c.heads.forEach((_, h) => {
        assert.deepEqual(Array.from(bank.targets[h]!), c.targets1[h], `epoch 1 targets of head ${h}`);
        assert.ok(
          relativeError(centroids1[h]!, c.centroids1[h]!) < CENTROID_TOL,
          `epoch 1 centroids of head ${h}`,
        );
      });
      // The dropped remainder has no target.
      assert.ok(c.targets1[0]!.includes(NO_TARGET), "the fixture has samples outside the bank");

      // The loss of one batch, one of whose samples has no target.
      const targets = batchTargets(bank, Int32Array.from(c.loss.indices));
      assert.ok(targets[0]!.includes(NO_TARGET), "a sample without target");
      const prototypes = centroids1.map((w, h) => tf.tensor2d(w, [c.heads[h]!, c.dim]));
      const z = tf.tensor2d(c.loss.embeddings, [c.loss.embeddings.length / c.dim, c.dim]);
      const f = (e: tf.Tensor) =>
        clusterLoss({ embeddings: e as tf.Tensor2D, prototypes, targets }, {
          temperature: c.loss.temperature,
        });
      const value = f(z);
      const grad = tf.grad(f)(z);
      const got = (await value.data())[0]!;
      assert.ok(Math.abs(got - c.loss.value) / c.loss.value < 1e-5, `loss ${got} vs ${c.loss.value}`);
      const e = relativeError(await grad.data(), c.loss.grad);
      assert.ok(e < 1e-4, `gradient relative error ${e}`);
      tf.dispose([value, grad, z, ...prototypes]);
    });
  }
});

Deno.test("DeepCluster-v2: the fixture's duplicate start row leaves a cluster empty (kept as it is)", async () => {
  const c = fixture.deepclusterv2.find((x) => x.name.includes("empty"))!;
  const bank = makeMemoryBank({
    size: c.size,
    dim: c.dim,
    crops: c.cropsForAssign.length,
    heads: c.heads.length,
  });
  for (const batch of c.init) {
    batch.crops.forEach((rows, i) =>
      writeCrop(bank, i, Int32Array.from(batch.indices), Float32Array.from(rows))
    );
  }
  const ids = presentIds(bank);
  // The first assignment from the duplicated start rows: cluster 1 gets no member (ties go to the first).
  const first = await Effect.runPromise(sphericalKmeans({
    rows: rowsOf(bank, 0, ids),
    n: ids.length,
    dim: c.dim,
    start: startsFrom(ids, c.starts0)(0),
    iterations: 0,
  }));
  assert.ok(!first.assignments.includes(1), "cluster 1 is empty after the first assignment");
});

Deno.test("DeepCluster-v2: a bank smaller than K fails in one line naming both numbers", async () => {
  const bank = makeMemoryBank({ size: 10, dim: 4, crops: 1, heads: 1 });
  writeCrop(bank, 0, Int32Array.from([1, 2, 3]), new Float32Array(12).fill(0.5));
  const exit = await Effect.runPromiseExit(
    clusterMemory(bank, [5], 10, (_h, n, k) => startRows(n, k, 1, 0, 0)),
  );
  assert.ok(Exit.isFailure(exit));
  assert.match(String(exit.cause), /holds 3 samples, fewer than the 5 prototypes/);
});

Deno.test("startRows: K distinct positions, the same for the same seed, epoch and head", () => {
  const a = startRows(50, 20, 7, 3, 1);
  assert.equal(new Set(a).size, 20);
  assert.ok(a.every((p) => p >= 0 && p < 50));
  assert.deepEqual(a, startRows(50, 20, 7, 3, 1));
  assert.notDeepEqual(a, startRows(50, 20, 7, 4, 1));
});

Deno.test("SimCLR NT-Xent (multi-crop) and its gradient match solo-learn's formula in float64", async (t) => {
  for (const c of fixture.simclr) {
    await t.step(c.name, async () => {
      const z = tf.tensor2d(c.embeddings, [c.crops * c.batchSize, c.dim]);
      const f = (e: tf.Tensor) =>
        ntXent({ embeddings: e as tf.Tensor2D, batchSize: c.batchSize }, { temperature: c.temperature });
      const value = f(z);
      const grad = tf.grad(f)(z);
      const got = (await value.data())[0]!;
      assert.ok(Math.abs(got - c.value) / c.value < 1e-5, `loss ${got} vs ${c.value}`);
      const e = relativeError(await grad.data(), c.grad);
      assert.ok(e < 1e-4, `gradient relative error ${e}`);
      tf.dispose([z, value, grad]);
    });
  }
});

Deno.test("the memory bank's fill tells its progress about every tenth of the way, never per batch", () => {
  for (const total of [20, 21, 29, 99, 100, 101, 600, 937, 5000]) {
    const due = Array.from({ length: total + 1 }, (_, done) => done).filter((d) => fillProgressDue(d, total));
    assert.ok(due.length >= 6 && due.length <= 9, `${total} batches: ${due}`);
    assert.ok(!due.includes(0) && !due.includes(total), `${total} batches: not at the start or the end`);
    const gaps = due.slice(1).map((d, i) => d - due[i]!);
    assert.ok(gaps.every((g) => g === gaps[0] && g >= total / 10), `${total} batches: gaps ${gaps}`);
  }
  for (const total of [1, 7, 19]) {
    assert.ok(Array.from({ length: total + 1 }, (_, d) => d).every((d) => !fillProgressDue(d, total)));
  }
});

// ---- each method through the stock pretrain pipeline ----

const dataFolder = await Deno.makeTempDir({ prefix: "swav-methods-test-" });
await writeDemoDataset({ folder: dataFolder, perClassTrain: 12, perClassTest: 4, size: 16, seed: 1 });

const tinyConfig = (out: string, method: string, train: object = {}): RunConfigInput => ({
  data: { source: `${dataFolder}:train`, workers: 0 },
  multicrop: {
    nmbCrops: [2, 2],
    sizeCrops: [16, 8],
    minScaleCrops: [0.3, 0.1],
    maxScaleCrops: [1, 0.3],
    blur: false,
  },
  model: { arch: "resnet18", width: 4, stem: "cifar", hidden: 32, out: 16, prototypes: 20 },
  optim: { baseLr: 0.3, finalLr: 0.003, warmupEpochs: 0 },
  train: { method: method as "swav", epochs: 3, batchSize: 16, out, seed: 3, ...train },
});

const run = async (
  config: RunConfigInput,
  options: { resume?: boolean; onStep?: (m: StepMetrics) => void; onInfo?: (line: string) => void } = {},
) => {
  const decoded: RunConfig = await Effect.runPromise(decodeRunConfig(config, "test"));
  const exit = await Effect.runPromiseExit(
    pretrain(decoded, {
      ...(options.resume ? { resume: true } : {}),
      hooks: { onStep: options.onStep, onInfo: options.onInfo },
    }).pipe(Effect.provide(TensorBackend.layer("wasm"))),
  );
  assert.ok(Exit.isSuccess(exit), String(Exit.isFailure(exit) ? exit.cause : ""));
};

const withRunFolder = async (body: (out: string) => Promise<void>) => {
  const out = await Deno.makeTempDir({ prefix: "swav-methods-run-" });
  try {
    await body(out);
  } finally {
    await Deno.remove(out, { recursive: true });
  }
};

for (const method of ["deepclusterv2", "simclr"]) {
  Deno.test(`${method}: finite losses, the method's statistics, and a flat live tensor count`, async () => {
    await withRunFolder(async (out) => {
      const before = tf.memory().numTensors;
      const counts: number[] = [];
      const metrics: StepMetrics[] = [];
      const info: string[] = [];
      await run(tinyConfig(out, method), {
        onStep: (m) => {
          counts.push(tf.memory().numTensors);
          metrics.push(m);
        },
        onInfo: (line) => info.push(line),
      });
      // DeepCluster-v2's epoch start is told and timed: the fill before epoch 1, k-means at each epoch.
      const epochs = (await Deno.readTextFile(`${out}/epochs.jsonl`)).trim().split("\n").map((l) =>
        JSON.parse(l)
      );
      assert.equal(epochs.length, 3);
      const times = (e: Record<string, unknown>) => [e.fill_seconds, e.kmeans_seconds];
      if (method === "deepclusterv2") {
        for (const e of epochs) {
          for (const t of [...times(e), e.seconds]) {
            assert.ok(typeof t === "number" && Number.isFinite(t) && t >= 0, JSON.stringify(e));
          }
          assert.ok(e.fill_seconds + e.kmeans_seconds <= e.seconds, JSON.stringify(e));
        }
        // The fill (14 forwards) takes a while; after the first epoch there is none.
        assert.ok(epochs[0].fill_seconds > 0, JSON.stringify(epochs[0]));
        assert.ok(epochs.slice(1).every((e) => e.fill_seconds === 0), JSON.stringify(epochs));
        const fill = info.filter((l) => l.startsWith("filling the memory bank"));
        assert.equal(fill.length, 2, info.join("\n"));
        assert.match(fill[0]!, /^filling the memory bank: 120 samples, 2 crops \(.* over 7 batches\)$/);
        assert.match(fill[1]!, /^filling the memory bank: done in \d+\.\d s$/);
        const kmeans = info.filter((l) => / k-means: /.test(l));
        assert.deepEqual(kmeans.map((l) => l.split(":")[0]), ["epoch 1", "epoch 2", "epoch 3"]);
        assert.match(
          kmeans[0]!,
          // The bank holds the 7 whole batches of 16 (the last partial batch is dropped).
          /k-means: 3 heads x 20 clusters over 112 rows \(\d+ iterations\) in \d+\.\d s$/,
        );
      } else {
        assert.ok(epochs.every((e) => times(e).every((t) => t === undefined)), JSON.stringify(epochs));
        assert.ok(!info.some((l) => /memory bank|k-means/.test(l)));
      }
      assert.equal(metrics.length, 21);
      assert.ok(metrics.every((m) => Number.isFinite(m.loss)), `losses ${metrics.map((m) => m.loss)}`);
      if (method === "simclr") {
        assert.ok(metrics.every((m) => m.embedding_std! > 0 && m.prototypes_in_use === undefined));
      } else {
        assert.ok(metrics.every((m) => m.prototypes_in_use! >= 1 && m.code_entropy === undefined));
      }
      // The first steps allocate once (momentum slots); after that the count stays flat.
      const steady = counts.slice(3);
      assert.ok(steady.every((c) => c === steady[0]), `tensor count drifts: ${counts}`);
      assert.equal(tf.memory().numTensors, before, "the run's scope releases every tensor");
      const saved = await Effect.runPromise(
        readCheckpoint((await Effect.runPromise(latestCheckpoint(out)))!),
      );
      assert.equal(saved.extra["method"], method);
    });
  });

  Deno.test(`${method}: resume mid-epoch continues exactly (N steps + resume + N equal 2N straight)`, async () => {
    // 7 steps an epoch: N = 9 stops mid-way through the second epoch, after its k-means.
    const n = 9;
    await withRunFolder(async (straight) => {
      await withRunFolder(async (resumed) => {
        const lossesA: number[] = [];
        const lossesB: number[] = [];
        await run(tinyConfig(straight, method, { maxSteps: 2 * n }), { onStep: (m) => lossesA.push(m.loss) });
        await run(tinyConfig(resumed, method, { maxSteps: n }), { onStep: (m) => lossesB.push(m.loss) });
        await run(tinyConfig(resumed, method, { maxSteps: 2 * n }), {
          resume: true,
          onStep: (m) => lossesB.push(m.loss),
        });
        assert.deepEqual(lossesB, lossesA);
        const read = async (out: string) =>
          await Effect.runPromise(readCheckpoint((await Effect.runPromise(latestCheckpoint(out)))!));
        const [x, y] = [await read(straight), await read(resumed)];
        if (method === "deepclusterv2") {
          assert.ok(
            x.arrays.some((a) => a.name === "bank/0") && x.arrays.some((a) => a.name === "targets/2"),
          );
        }
        const byName = new Map(y.arrays.map((a) => [a.name, a]));
        for (const a of x.arrays) {
          const other = byName.get(a.name)!;
          assert.ok(a.values.every((v, i) => v === other.values[i]), `${a.name} differs`);
        }
      });
    });
  });
}

Deno.test("train.method sets the prototype heads: three of K for deepclusterv2, none for simclr, one list is not swav", async () => {
  const decode = (raw: unknown) => Effect.runPromiseExit(decodeRunConfig(raw, "my.json"));
  const dc = await decode({ train: { method: "deepclusterv2" }, model: { prototypes: 50 } });
  assert.ok(Exit.isSuccess(dc) && JSON.stringify(dc.value.model.prototypes) === "[50,50,50]");
  const listed = await decode({ train: { method: "deepclusterv2" }, model: { prototypes: [40, 20] } });
  assert.ok(Exit.isSuccess(listed) && JSON.stringify(listed.value.model.prototypes) === "[40,20]");
  const simclr = await decode({ train: { method: "simclr" } });
  assert.ok(Exit.isSuccess(simclr) && JSON.stringify(simclr.value.model.prototypes) === "[]");
  const swav = await decode({ model: { prototypes: [40, 20] } });
  assert.ok(Exit.isFailure(swav));
  assert.match(
    String(swav.cause),
    /my\.json: model\.prototypes is a list \[40,20\], but swav uses one prototype head/,
  );
  const crops = await decode({
    train: { method: "deepclusterv2" },
    multicrop: { nmbCrops: [1], sizeCrops: [32], minScaleCrops: [0.2], maxScaleCrops: [1] },
  });
  assert.ok(Exit.isFailure(crops));
  assert.match(
    String(crops.cause),
    /deepclusterv2\.cropsForAssign names crop 1, but multicrop\.nmbCrops \[1\]/,
  );
  const bad = await decode({ train: { method: "byol" } });
  assert.ok(Exit.isFailure(bad));
  assert.match(String(bad.cause), /method/);
});

Deno.test("a user's own method (examples/custom_method.ts) runs through the stock pretrain", async () => {
  const { alignUniformMethod } = await import("../examples/custom_method.ts");
  await withRunFolder(async (out) => {
    const config = await Effect.runPromise(
      decodeRunConfig(tinyConfig(out, "simclr", { maxSteps: 4 }), "test"),
    );
    const losses: number[] = [];
    const exit = await Effect.runPromiseExit(
      pretrain(config, { method: alignUniformMethod, hooks: { onStep: (m) => losses.push(m.loss) } }).pipe(
        Effect.provide(TensorBackend.layer("wasm")),
      ),
    );
    assert.ok(Exit.isSuccess(exit), String(Exit.isFailure(exit) ? exit.cause : ""));
    assert.equal(losses.length, 4);
    // Alignment is in [0, 4] and uniformity in [−4, 0]: the sum lies in [−4, 4].
    assert.ok(losses.every((l) => Number.isFinite(l) && l > -4 && l < 4), `losses ${losses}`);
  });
});
