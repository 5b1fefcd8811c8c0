/**
 * A run folder keeps its history: a fresh run into a folder holding a run is
 * refused before anything there changes (config.json included, and a run that
 * fails at start changes nothing); --force moves the earlier run into
 * previous-N and deletes nothing; --resume continues it.
 */
import assert from "node:assert/strict";
import { Effect, Exit } from "effect";
import { TensorBackend } from "../backend/tensor_backend.ts";
import { decodeRunConfig } from "../config/config.ts";
import { lockRunFolder } from "../pipelines/run_folder.ts";
import { checkEarlierRun, runMarks } from "../pipelines/run_history.ts";
import { pretrain, type PretrainOptions } from "../pipelines/pretrain.ts";
import { tinyRunConfig, writeTinyData } from "./_tiny_run.ts";

/** Every file under `folder` (relative path -> bytes as text), for before/after comparisons. */
const snapshot = async (folder: string): Promise<Map<string, string>> => {
  const out = new Map<string, string>();
  const walk = async (dir: string, prefix: string) => {
    for await (const entry of Deno.readDir(dir)) {
      const path = `${dir}/${entry.name}`;
      if (entry.isDirectory) await walk(path, `${prefix}${entry.name}/`);
      else if (entry.name !== ".lock") out.set(`${prefix}${entry.name}`, await Deno.readTextFile(path));
    }
  };
  await walk(folder, "");
  return out;
};

const train = async (data: string, out: string, train: object, options: PretrainOptions = {}) => {
  const config = await Effect.runPromise(
    decodeRunConfig(tinyRunConfig(data, out, { knnEvery: 0, epochs: 1, ...train }), "test"),
  );
  return await Effect.runPromiseExit(
    pretrain(config, options).pipe(Effect.provide(TensorBackend.layer("wasm"))),
  );
};

Deno.test("runMarks names what makes a folder a run, and nothing else", () => {
  assert.equal(runMarks([]), undefined);
  assert.equal(runMarks([".lock", "report.html", "previous-1"]), undefined);
  assert.equal(runMarks(["config.json"]), "config.json");
  assert.equal(
    runMarks(["checkpoint-000000004.swav", "metrics.jsonl", "checkpoint-000000002.swav"]),
    "metrics.jsonl, 2 checkpoints up to checkpoint-000000004.swav",
  );
});

Deno.test("checkEarlierRun: --resume with --force is refused; an empty folder passes", async () => {
  const folder = await Deno.makeTempDir();
  try {
    const both = await Effect.runPromiseExit(Effect.scoped(
      Effect.flatMap(lockRunFolder(folder), (f) => checkEarlierRun(f, { resume: true, force: true })),
    ));
    assert.ok(Exit.isFailure(both));
    assert.match(String(both.cause), /ResumeWithForce/);
    const empty = await Effect.runPromiseExit(Effect.scoped(
      Effect.flatMap(lockRunFolder(folder), (f) => checkEarlierRun(f, {})),
    ));
    assert.ok(Exit.isSuccess(empty));
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
});

Deno.test("pretrain into a folder holding a run: refused unchanged, --force moves it aside, --resume continues", async () => {
  const data = await writeTinyData();
  const out = await Deno.makeTempDir();
  try {
    const first = await train(data, out, { maxSteps: 3 });
    assert.ok(Exit.isSuccess(first), String(first));
    const before = await snapshot(out);
    assert.ok(before.has("config.json") && before.has("checkpoint-000000003.swav"));

    // Another architecture, no --resume: one error naming the run and the ways on; nothing changed.
    const again = await train(data, out, { maxSteps: 1 }, {});
    assert.ok(Exit.isFailure(again));
    const message = String(again.cause);
    assert.match(message, /RunFolderHoldsRun/);
    assert.match(
      message,
      /already holds a run \(config\.json, metrics\.jsonl, epochs\.jsonl, checkpoint-000000003/,
    );
    assert.match(message, /--resume.*another --out.*--force/);
    assert.deepEqual(await snapshot(out), before);

    // A run that fails at start (a batch larger than the data set), even with --force, changes nothing.
    const tooBig = await train(data, out, { batchSize: 4096 }, { force: true });
    assert.ok(Exit.isFailure(tooBig));
    assert.match(String(tooBig.cause), /DatasetTooSmall/);
    assert.deepEqual(await snapshot(out), before);

    // --force: the earlier run moves into previous-1 byte for byte, the new one starts at step 0.
    const infos: string[] = [];
    const forced = await train(data, out, { maxSteps: 1 }, {
      force: true,
      hooks: { onInfo: (line) => infos.push(line) },
    });
    assert.ok(Exit.isSuccess(forced), String(forced));
    assert.equal(forced.value.steps, 1);
    assert.ok(infos.some((line) => line.includes(`moved into ${out}/previous-1`)), infos.join("\n"));
    const after = await snapshot(out);
    for (const [name, text] of before) assert.equal(after.get(`previous-1/${name}`), text, name);
    assert.ok(after.has("checkpoint-000000001.swav") && !after.has("checkpoint-000000003.swav"));

    // A second --force keeps both earlier runs.
    const forcedAgain = await train(data, out, { maxSteps: 1 }, { force: true });
    assert.ok(Exit.isSuccess(forcedAgain), String(forcedAgain));
    const third = await snapshot(out);
    assert.ok(third.has("previous-1/checkpoint-000000003.swav"));
    assert.ok(third.has("previous-2/checkpoint-000000001.swav"));

    // --resume continues the current run.
    const resumed = await train(data, out, { maxSteps: 2 }, { resume: true });
    assert.ok(Exit.isSuccess(resumed), String(resumed));
    assert.equal(resumed.value.steps, 2);
  } finally {
    await Deno.remove(out, { recursive: true });
    await Deno.remove(data, { recursive: true });
  }
});
