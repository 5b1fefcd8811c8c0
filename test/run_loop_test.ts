/**
 * The run loop on bad luck (issue 18): skipped samples do not end training
 * early, a non-finite weight or statistic never reaches a checkpoint, metrics
 * do not repeat steps after a resume, the run folder records the environment
 * and the skipped samples, and temp files of another writer are left alone.
 */
import assert from "node:assert/strict";
import { Effect, Exit } from "effect";
import { TensorBackend } from "../backend/tensor_backend.ts";
import { decodeRunConfig, type RunConfigInput } from "../config/config.ts";
import { writeDemoDataset } from "../data/demo_dataset.ts";
import { pruneCheckpoints, readCheckpoint, writeCheckpoint } from "../pipelines/checkpoint.ts";
import { pretrain, type PretrainOptions } from "../pipelines/pretrain.ts";
import { LOCK_FILE } from "../pipelines/run_folder.ts";

/** 10 classes x 4 PNGs of 16 px; `truncated` of them cut in half (unreadable). */
const imageFolder = async (truncated: number) => {
  const folder = await Deno.makeTempDir({ prefix: "swav-runloop-data-" });
  await writeDemoDataset({ folder, perClassTrain: 4, perClassTest: 1, size: 16, seed: 2 });
  const bad: string[] = [];
  const classes = [...Deno.readDirSync(`${folder}/train`)].map((e) => e.name).sort();
  for (const c of classes.slice(0, truncated)) {
    const name = [...Deno.readDirSync(`${folder}/train/${c}`)].map((e) => e.name).sort()[0]!;
    const path = `${folder}/train/${c}/${name}`;
    const bytes = await Deno.readFile(path);
    await Deno.writeFile(path, bytes.subarray(0, bytes.length >> 1));
    bad.push(path);
  }
  return { folder, bad };
};

const tinyConfig = (source: string, out: string, over: { train?: object; optim?: object } = {}) =>
  Effect.runPromise(decodeRunConfig(
    {
      data: { source, workers: 0 },
      multicrop: { nmbCrops: [2], sizeCrops: [16], minScaleCrops: [0.3], maxScaleCrops: [1], blur: false },
      model: { arch: "resnet18", width: 4, stem: "cifar", hidden: 16, out: 8, prototypes: 20 },
      swav: { queueLength: 0 },
      optim: { warmupEpochs: 0, ...over.optim },
      train: { epochs: 3, batchSize: 8, out, seed: 4, ...over.train },
    } as RunConfigInput,
    "test",
  ));

const run = async (
  source: string,
  out: string,
  over: { train?: object; optim?: object } = {},
  options: PretrainOptions = {},
) =>
  Effect.runPromiseExit(
    pretrain(await tinyConfig(source, out, over), options).pipe(Effect.provide(TensorBackend.layer("wasm"))),
  );

const withTemp = async (body: (dir: string) => Promise<void>) => {
  const dir = await Deno.makeTempDir({ prefix: "swav-runloop-" });
  try {
    await body(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
};

const checkpointsIn = (folder: string) =>
  [...Deno.readDirSync(folder)].map((e) => e.name).filter((n) => /^checkpoint-\d+\.swav$/.test(n)).sort();

Deno.test("skipped samples do not end training early; --resume advances; skipped.jsonl names them", async () => {
  const { folder, bad } = await imageFolder(5);
  try {
    await withTemp(async (out) => {
      // 35 readable images, batch 8: 4 batches an epoch (source.length says 5).
      const first = await run(`${folder}:train`, out);
      assert.ok(Exit.isSuccess(first), String(Exit.isFailure(first) && first.cause));
      assert.equal(first.value.skippedSamples, 15);
      assert.equal(first.value.steps, 12, "3 epochs of 4 batches");
      assert.equal(first.value.epochs, 3);
      const skipped = Deno.readTextFileSync(`${out}/skipped.jsonl`).trim().split("\n").map((l) =>
        JSON.parse(l)
      );
      assert.deepEqual(skipped.map((s) => s.path).sort(), [...bad].sort());
      assert.ok(skipped.every((s) => typeof s.reason === "string" && s.reason.length > 0));
      const resumed = await run(`${folder}:train`, out, { train: { epochs: 4 } }, { resume: true });
      assert.ok(Exit.isSuccess(resumed), String(Exit.isFailure(resumed) && resumed.cause));
      assert.equal(resumed.value.steps, 16, "the resumed run trains its fourth epoch");
    });
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
});

Deno.test("the run folder holds environment.json (the doctor's report) and its lock is free after the run", async () => {
  const { folder } = await imageFolder(0);
  try {
    await withTemp(async (out) => {
      const exit = await run(`${folder}:train`, out, { train: { epochs: 1, maxSteps: 1 } });
      assert.ok(Exit.isSuccess(exit), String(Exit.isFailure(exit) && exit.cause));
      const environment = JSON.parse(Deno.readTextFileSync(`${out}/environment.json`));
      assert.equal(typeof environment.deno.version, "string");
      assert.ok(Array.isArray(environment.missing));
      assert.deepEqual([...Deno.readDirSync(out)].filter((e) => e.name.endsWith(".tmp")), []);
      const lock = await Deno.open(`${out}/${LOCK_FILE}`, { read: true, write: true });
      try {
        assert.ok(await lock.tryLock(true), "the lock is released when the run ends");
      } finally {
        lock.close();
      }
    });
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
});

for (
  const [name, optim] of [
    ["baseLr and trust 1e30", { baseLr: 1e30, finalLr: 1e30, trust: 1e30 }],
    ["baseLr 1e6", { baseLr: 1e6, finalLr: 1e6 }],
  ] as const
) {
  Deno.test(`${name}: the run stops naming the step and tensor; no checkpoint holds a non-finite value`, async () => {
    const { folder } = await imageFolder(0);
    try {
      await withTemp(async (out) => {
        const exit = await run(`${folder}:train`, out, { train: { epochs: 2, checkpointEvery: 1 }, optim });
        assert.ok(Exit.isFailure(exit), "the run must fail, not end with exit 0");
        assert.match(String(exit.cause), /NonFinite(State|Loss)/);
        assert.match(String(exit.cause), /step \d+/);
        if (/NonFiniteState/.test(String(exit.cause))) {
          assert.match(String(exit.cause), /made [\w.]+ non-finite/);
        }
        for (const name of checkpointsIn(out)) {
          const checkpoint = await Effect.runPromise(readCheckpoint(`${out}/${name}`));
          const bad = checkpoint.arrays.filter((a) => !a.values.every(Number.isFinite)).map((a) => a.name);
          assert.deepEqual(bad, [], `${name} holds non-finite values`);
        }
      });
    } finally {
      await Deno.remove(folder, { recursive: true });
    }
  });
}

Deno.test("after a resume each step appears once in metrics.jsonl (lines past the checkpoint dropped)", async () => {
  const { folder } = await imageFolder(0);
  try {
    await withTemp(async (out) => {
      const first = await run(`${folder}:train`, out, { train: { maxSteps: 4 } });
      assert.ok(Exit.isSuccess(first));
      // As a kill -9 after the metrics line and before the checkpoint leaves it: steps 5 and 6, a torn line.
      const lines = Deno.readTextFileSync(`${out}/metrics.jsonl`).trim().split("\n");
      const last = JSON.parse(lines.at(-1)!);
      Deno.writeTextFileSync(
        `${out}/metrics.jsonl`,
        [JSON.stringify({ ...last, step: 5 }), JSON.stringify({ ...last, step: 6 }), '{"epoch":1,"st'].join(
          "\n",
        ),
        { append: true },
      );
      Deno.writeTextFileSync(`${out}/metrics.jsonl`, "\n", { append: true });
      const resumed = await run(`${folder}:train`, out, { train: { maxSteps: 8 } }, { resume: true });
      assert.ok(Exit.isSuccess(resumed));
      const steps = Deno.readTextFileSync(`${out}/metrics.jsonl`).trim().split("\n").map((l) =>
        JSON.parse(l).step
      );
      assert.deepEqual(steps, [1, 2, 3, 4, 5, 6, 7, 8]);
    });
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
});

Deno.test("the checkpoint writer refuses a non-finite value; pruning leaves another writer's temp file", async () => {
  await withTemp(async (folder) => {
    const checkpoint = (step: number, value: number) => ({
      step,
      epoch: 0,
      batchInEpoch: 0,
      config: {},
      extra: {},
      arrays: [{ name: "w", shape: [2], values: Float32Array.of(1, value) }],
    });
    const refused = await Effect.runPromiseExit(
      writeCheckpoint(folder, checkpoint(1, Number.POSITIVE_INFINITY)),
    );
    assert.ok(Exit.isFailure(refused));
    assert.match(String(refused.cause), /w holds a non-finite value/);
    assert.deepEqual([...Deno.readDirSync(folder)], [], "nothing written, no temp file");
    // Another writer's half-written checkpoint (a UUID-tagged temp name, as before the lock).
    const foreign = `${folder}/checkpoint-000000001.swav.00000000-0000-4000-8000-000000000000.tmp`;
    await Deno.writeFile(foreign, new Uint8Array(10));
    for (const step of [1, 2, 3]) await Effect.runPromise(writeCheckpoint(folder, checkpoint(step, 2)));
    await Effect.runPromise(pruneCheckpoints(folder, 1));
    assert.deepEqual(checkpointsIn(folder), ["checkpoint-000000003.swav"]);
    assert.ok(Deno.statSync(foreign).isFile, "another writer's temp file is not ours to remove");
  });
});
