import assert from "node:assert/strict";
import { writeDemoDataset } from "../data/demo_dataset.ts";
import { cliPath, runCli } from "./_helpers.ts";

const swav = (...args: string[]) => runCli(args);

/** A tiny labelled data set under `folder/data` and a config for it at `folder/tiny.json`. */
const writeTinyRun = async (
  folder: string,
  options: { perClassTrain: number; seed: number; train: Record<string, unknown> },
) => {
  await writeDemoDataset({
    folder: `${folder}/data`,
    perClassTrain: options.perClassTrain,
    perClassTest: 2,
    size: 16,
    seed: options.seed,
  });
  await Deno.writeTextFile(
    `${folder}/tiny.json`,
    JSON.stringify({
      data: { source: `${folder}/data:train`, workers: 1 },
      multicrop: { nmbCrops: [2], sizeCrops: [16], minScaleCrops: [0.3], maxScaleCrops: [1], blur: false },
      model: { arch: "resnet18", width: 4, stem: "cifar", hidden: 16, out: 8, prototypes: 20 },
      train: options.train,
    }),
  );
};

Deno.test("pretrain CLI: bad input fails with one line naming the problem, exit code 1", async (t) => {
  const folder = await Deno.makeTempDir();
  try {
    await t.step("a missing config file", async () => {
      const r = await swav("pretrain", "--config", `${folder}/nope.json`);
      assert.equal(r.code, 1);
      assert.match(r.stderr, /error: .*nope\.json.*no such file/);
    });
    await t.step("a config field out of range", async () => {
      await Deno.writeTextFile(`${folder}/bad.json`, JSON.stringify({ train: { batchSize: -3 } }));
      const r = await swav("pretrain", "--config", `${folder}/bad.json`);
      assert.equal(r.code, 1);
      assert.match(r.stderr, /bad\.json/);
      assert.match(r.stderr, /batchSize/);
    });
    await t.step("a file that is not JSON", async () => {
      await Deno.writeTextFile(`${folder}/broken.json`, "{ train: ");
      const r = await swav("pretrain", "--config", `${folder}/broken.json`);
      assert.equal(r.code, 1);
      assert.match(r.stderr, /broken\.json is not valid JSON/);
    });
    await t.step("a data folder that does not exist", async () => {
      const r = await swav("pretrain", "--data", `${folder}/no-such-data`, "--out", `${folder}/run`);
      assert.equal(r.code, 1);
      assert.match(r.stderr, /no-such-data.*no such folder|no such folder.*no-such-data/);
    });
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
});

Deno.test("pretrain CLI: a short run, then --resume continues from its checkpoint", async () => {
  const folder = await Deno.makeTempDir();
  try {
    await writeTinyRun(folder, { perClassTrain: 4, seed: 5, train: { epochs: 2, batchSize: 8 } });
    const first = await swav(
      "pretrain",
      "--config",
      `${folder}/tiny.json`,
      "--out",
      `${folder}/run`,
      "--max-steps",
      "3",
      "--json",
    );
    assert.equal(first.code, 0, first.stderr);
    const summary = JSON.parse(first.stdout.trim().split("\n").at(-1)!);
    assert.equal(summary.steps, 3);
    assert.match(summary.checkpoint, /checkpoint-000000003\.swav$/);
    const second = await swav(
      "pretrain",
      "--config",
      `${folder}/tiny.json`,
      "--out",
      `${folder}/run`,
      "--resume",
      "--json",
    );
    assert.equal(second.code, 0, second.stderr);
    assert.match(second.stderr, /resumed from .*checkpoint-000000003\.swav at step 3/);
    // 40 images, batch 8: 5 steps per epoch, 2 epochs.
    assert.equal(JSON.parse(second.stdout.trim().split("\n").at(-1)!).steps, 10);
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
});

Deno.test("pretrain CLI: Ctrl-C stops cleanly, leaving only complete checkpoints", async () => {
  const folder = await Deno.makeTempDir();
  try {
    await writeTinyRun(folder, {
      perClassTrain: 8,
      seed: 6,
      train: { epochs: 1000, batchSize: 8, checkpointEvery: 1 },
    });
    const child = new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        "--allow-all",
        cliPath,
        "pretrain",
        "--config",
        `${folder}/tiny.json`,
        "--out",
        `${folder}/run`,
      ],
      env: { NO_COLOR: "1", SWAV_BACKEND: "wasm" },
      stdout: "null",
      stderr: "piped",
    }).spawn();
    // Wait for a few checkpoints, then interrupt as a terminal's Ctrl-C does.
    const deadline = Date.now() + 60_000;
    const checkpoints = () => {
      try {
        return [...Deno.readDirSync(`${folder}/run`)].filter((e) => e.name.endsWith(".swav")).length;
      } catch {
        return 0;
      }
    };
    while (checkpoints() < 3 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
    assert.ok(checkpoints() >= 3, "the run did not start checkpointing in time");
    child.kill("SIGINT");
    const status = await child.status;
    const stderr = new TextDecoder().decode(
      (await child.stderr.getReader().read()).value ?? new Uint8Array(),
    );
    assert.notEqual(status.code, 0, `an interrupted run must not report success (stderr: ${stderr})`);
    const names = [...Deno.readDirSync(`${folder}/run`)].map((e) => e.name);
    assert.deepEqual(names.filter((n) => n.endsWith(".tmp")), [], "no half-written checkpoint is left");
    // The newest checkpoint is complete and loads.
    const { latestCheckpoint, readCheckpoint } = await import("../pipelines/checkpoint.ts");
    const { Effect } = await import("effect");
    const latest = await Effect.runPromise(latestCheckpoint(`${folder}/run`));
    const checkpoint = await Effect.runPromise(readCheckpoint(latest!));
    assert.ok(checkpoint.step >= 3);
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
});
