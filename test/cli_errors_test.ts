/**
 * Issue 18 through the CLI: a damaged latest checkpoint is skipped with a
 * warning (resume, export, eval, extract on a run folder); failures are one
 * line with exit code 1, before any work where the input allows.
 */
import assert from "node:assert/strict";
import { writeDemoDataset } from "../data/demo_dataset.ts";
import { runCli } from "./_helpers.ts";

const swav = (...args: string[]) => runCli(args);

/** Exit code 1, exactly one `error:` line, no stack trace. */
const assertOneLineError = (r: { code: number; stderr: string }, pattern: RegExp) => {
  assert.equal(r.code, 1, r.stderr);
  const errors = r.stderr.split("\n").filter((line) => line.startsWith("error: "));
  assert.equal(errors.length, 1, r.stderr);
  assert.doesNotMatch(r.stderr, /\n\s+at |Stack backtrace/, r.stderr);
  assert.match(errors[0]!, pattern);
};

const model = { arch: "resnet18", width: 4, stem: "cifar", hidden: 16, out: 8, prototypes: 20 };
const tinyConfig = (folder: string, width = 4) => ({
  data: { source: `${folder}/data:train`, workers: 1 },
  multicrop: { nmbCrops: [2], sizeCrops: [16], minScaleCrops: [0.3], maxScaleCrops: [1], blur: false },
  model: { ...model, width },
  train: { epochs: 2, batchSize: 8, checkpointEvery: 2, keepCheckpoints: 5 },
});

Deno.test("CLI: a config file holding a JSON array is rejected with one line naming it", async () => {
  const folder = await Deno.makeTempDir();
  try {
    await Deno.writeTextFile(`${folder}/arr.json`, "[]");
    const r = await swav("pretrain", "--config", `${folder}/arr.json`, "--out", `${folder}/run`);
    assertOneLineError(r, /InvalidConfig: .*arr\.json holds an array: a config file must be one JSON object/);
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
});

Deno.test("CLI: a damaged latest checkpoint falls back to the previous one; bad --out and shapes are one line", async (t) => {
  const folder = await Deno.makeTempDir();
  try {
    await writeDemoDataset({
      folder: `${folder}/data`,
      perClassTrain: 4,
      perClassTest: 2,
      size: 16,
      seed: 3,
    });
    await Deno.writeTextFile(`${folder}/tiny.json`, JSON.stringify(tinyConfig(folder)));
    const run = `${folder}/run`;
    const first = await swav("pretrain", "--config", `${folder}/tiny.json`, "--out", run, "--max-steps", "4");
    assert.equal(first.code, 0, first.stderr);
    const newest = `${run}/checkpoint-000000004.swav`;
    const bytes = await Deno.readFile(newest);
    await Deno.writeFile(newest, bytes.subarray(0, bytes.length - 100));

    await t.step("export --checkpoint RUN_FOLDER", async () => {
      const r = await swav("export", "--checkpoint", run, "--out", `${folder}/export`);
      assert.equal(r.code, 0, r.stderr);
      assert.match(
        r.stderr,
        /warning: .*checkpoint-000000004\.swav.*truncated payload.*checkpoint-000000002\.swav/,
      );
    });
    await t.step("extract checks --out before any work", async () => {
      await Deno.writeTextFile(`${folder}/file`, "x");
      const r = await swav("extract", "--checkpoint", run, "--out", `${folder}/file/features`);
      assertOneLineError(r, /EvaluationError: cannot write to .*file\/features/);
      assert.doesNotMatch(r.stderr, /features \d+\/\d+/, "features were computed before the check");
    });
    await t.step("pretrain --resume", async () => {
      const r = await swav(
        "pretrain",
        "--config",
        `${folder}/tiny.json`,
        "--out",
        run,
        "--resume",
        "--max-steps",
        "5",
      );
      assert.equal(r.code, 0, r.stderr);
      assert.match(r.stderr, /warning: .*checkpoint-000000004\.swav.*truncated payload/);
      assert.match(r.stderr, /resumed from .*checkpoint-000000002\.swav at step 2/);
    });
    await t.step("a shape mismatch on resume", async () => {
      await Deno.writeTextFile(`${folder}/wide.json`, JSON.stringify(tinyConfig(folder, 8)));
      const r = await swav("pretrain", "--config", `${folder}/wide.json`, "--out", run, "--resume");
      assertOneLineError(r, /ModelWeightsError: checkpoint .*another architecture/);
    });
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
});
