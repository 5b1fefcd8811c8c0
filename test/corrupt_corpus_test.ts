/**
 * Issue 18's regression test over the corrupt-input corpus (test/fixtures/corrupt/,
 * written by reference/make_corrupt_corpus.py): `pretrain` (twice), `eval --method
 * knn` and `extract` over an image folder of good images mixed with the corpus
 * and with special files (a directory and a FIFO with image names, a symlink
 * loop). Exactly the bad files are skipped and named, in the same order on two
 * runs; the good-but-unusual files decode; the run trains the epochs it was
 * asked for. Fails on the main of issue 18's filing (a corrupt JPEG breaks the
 * JPEG decoder for later files; skipped samples end training early; only a few
 * skipped files are named).
 */
import assert from "node:assert/strict";
import { lastJson, namesMentioned, swav, tinyConfig, writeCorruptDataset } from "../bench/corrupt_dataset.ts";

const perClass = 24;
const batchSize = 8;
const epochs = 2;

Deno.test("issue 18 corpus: pretrain, eval and extract skip and name exactly the bad files, and train every epoch", async (t) => {
  const folder = await Deno.makeTempDir({ prefix: "swav-corrupt-" });
  try {
    const data = await writeCorruptDataset(`${folder}/data`, { perClass, testPerClass: 4, size: 32 });
    const generated = [
      ...Deno.readDirSync(`${folder}/data/train/a`),
      ...Deno.readDirSync(`${folder}/data/train/b`),
    ]
      .map((e) => e.name)
      .filter((n) => n.startsWith("good-"));
    const good = [...generated, ...data.unusual];
    const all = [...good, ...data.bad];
    await Deno.writeTextFile(
      `${folder}/tiny.json`,
      JSON.stringify(tinyConfig(`${folder}/data:train`, { epochs, batchSize, seed: 7 })),
    );
    const expectedSteps = epochs * Math.floor(data.goodTrain / batchSize);
    const sortedBad = [...data.bad].sort();

    const pretrain = (out: string) =>
      swav(["pretrain", "--config", `${folder}/tiny.json`, "--out", out, "--json"], { timeoutMs: 90_000 });
    const first = await pretrain(`${folder}/run1`);
    const second = await pretrain(`${folder}/run2`);

    await t.step("pretrain exits 0 and trains every epoch it was asked for", () => {
      for (const run of [first, second]) {
        assert.equal(run.timedOut, false, "pretrain hung");
        assert.equal(run.code, 0, run.stderr);
        const summary = lastJson(run.stdout);
        assert.ok(summary, `no JSON summary on stdout: ${run.stdout}`);
        assert.equal(summary.epochs, epochs, `epochs trained (stderr: ${run.stderr.slice(-600)})`);
        assert.equal(
          summary.steps,
          expectedSteps,
          `steps: ${epochs} epochs x floor(${data.goodTrain} good images / ${batchSize})`,
        );
        assert.ok(Number.isFinite(summary.loss), `last loss ${summary.loss}`);
      }
    });

    await t.step("pretrain names exactly the bad files (the good-but-unusual ones decode)", () => {
      const named = namesMentioned(first.stderr, all);
      assert.deepEqual(
        named.filter((n) => good.includes(n)),
        [],
        `good files reported as skipped:\n${first.stderr.slice(-2000)}`,
      );
      assert.deepEqual([...named].sort(), sortedBad, `bad files named:\n${first.stderr.slice(-2000)}`);
    });

    await t.step("two identical runs skip in the same order and end with the same loss", () => {
      assert.deepEqual(namesMentioned(second.stderr, all), namesMentioned(first.stderr, all));
      assert.deepEqual(lastJson(second.stdout)?.loss, lastJson(first.stdout)?.loss);
      assert.deepEqual(lastJson(second.stdout)?.skipped, lastJson(first.stdout)?.skipped);
    });

    await t.step("eval --method knn uses every good image and names exactly the bad files", async () => {
      const r = await swav([
        "eval",
        "--checkpoint",
        `${folder}/run1`,
        "--method",
        "knn",
        "--k",
        "5",
        "--train",
        `${folder}/data:train`,
        "--test",
        `${folder}/data:test`,
        "--json",
      ], { timeoutMs: 60_000 });
      assert.equal(r.timedOut, false, "eval hung");
      assert.equal(r.code, 0, r.stderr);
      const result = lastJson(r.stdout);
      assert.equal(result?.train_samples, data.goodTrain, `train samples (stderr: ${r.stderr.slice(-600)})`);
      assert.equal(result?.test_samples, data.goodTest);
      assert.deepEqual([...namesMentioned(r.stderr, all)].sort(), sortedBad, r.stderr.slice(-2000));
    });

    await t.step("extract writes one row per good image and names exactly the bad files", async () => {
      const r = await swav([
        "extract",
        "--checkpoint",
        `${folder}/run1`,
        "--data",
        `${folder}/data:train`,
        "--out",
        `${folder}/features`,
      ], { timeoutMs: 60_000 });
      assert.equal(r.timedOut, false, "extract hung");
      assert.equal(r.code, 0, r.stderr);
      const sidecar = JSON.parse(await Deno.readTextFile(`${folder}/features/features.json`));
      assert.equal(sidecar.count, data.goodTrain, `rows (stderr: ${r.stderr.slice(-600)})`);
      assert.deepEqual([...namesMentioned(r.stderr, all)].sort(), sortedBad, r.stderr.slice(-2000));
    });
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
});
