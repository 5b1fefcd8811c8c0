/**
 * Wrong results are never reported as fine: a data set of unreadable images
 * trains nothing and says so (no untrained checkpoint), weights that cannot be
 * right are refused at load naming the tensor, an export never invents a head,
 * never overwrites its input nor writes through a symlink, an evaluation on
 * other sources records them and leaves the run's own, and a labels file whose
 * name matches two classes is refused.
 */
import assert from "node:assert/strict";
import { Effect, Exit } from "effect";
import { TensorBackend } from "../backend/tensor_backend.ts";
import { exportCheckpointEncoder, type ExportFormat } from "../pipelines/extract_folder.ts";
import { subsetFromNames } from "../pipelines/semisup.ts";
import { loadWeightsFile } from "../pipelines/torch_weights.ts";
import { evaluate, evaluationJson } from "../pipelines/evaluate.ts";
import { writeEvalRecord } from "../pipelines/run_records.ts";
import { runCli } from "./_helpers.ts";
import { tinyRun, writeTinyData } from "./_tiny_run.ts";

/** Exit code 1 and exactly one `error:` line (warnings aside), no stack trace; that line. */
const oneError = (r: { code: number; stderr: string }): string => {
  assert.equal(r.code, 1, r.stderr);
  const errors = r.stderr.split("\n").filter((line) => line.startsWith("error: "));
  assert.equal(errors.length, 1, r.stderr);
  assert.doesNotMatch(r.stderr, /\n\s+at |Stack backtrace/, r.stderr);
  return errors[0]!;
};

const tinyConfig = (source: string) => ({
  data: { source, workers: 0 },
  multicrop: { nmbCrops: [2], sizeCrops: [16], minScaleCrops: [0.3], maxScaleCrops: [1], blur: false },
  model: { arch: "resnet18", width: 4, stem: "cifar", hidden: 16, out: 8, prototypes: 20 },
  swav: { queueLength: 0 },
  train: { epochs: 1, batchSize: 8, knnEvery: 0 },
});

Deno.test("pretrain on a folder of unreadable images: one error, exit 1, no checkpoint", async () => {
  const dir = await Deno.makeTempDir();
  try {
    for (const c of ["a", "b"]) {
      await Deno.mkdir(`${dir}/data/${c}`, { recursive: true });
      for (let i = 0; i < 10; i++) await Deno.writeTextFile(`${dir}/data/${c}/x${i}.png`, `not a png ${i}`);
    }
    await Deno.writeTextFile(`${dir}/c.json`, JSON.stringify(tinyConfig(`${dir}/data`)));
    const r = await runCli(["pretrain", "--config", `${dir}/c.json`, "--out", `${dir}/run`]);
    const line = oneError(r);
    assert.match(line, /NoTrainingBatch: epoch 1 gave no batch of 8: 20 of the 20 samples were unreadable/);
    assert.doesNotMatch(r.stdout, /done:/);
    const names = [...Deno.readDirSync(`${dir}/run`)].map((e) => e.name);
    assert.deepEqual(names.filter((n) => n.endsWith(".swav")), [], "an untrained checkpoint was written");
    assert.equal(Deno.readTextFileSync(`${dir}/run/skipped.jsonl`).trim().split("\n").length, 20);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

const fixture = (name: string) => new URL(`./fixtures/torch/${name}`, import.meta.url).pathname;

Deno.test("a .pth with a NaN weight or a negative running variance is refused at load, naming the tensor", async () => {
  const cases: Array<[string, RegExp]> = [
    ["resnet18_nan.pth", /tensor module\.layer1\.0\.conv1\.weight holds NaN at index \d+/],
    [
      "resnet18_negative_var.pth",
      /tensor module\.layer2\.0\.bn1\.running_var \(a batch-norm running variance\) holds the negative value -0\.5/,
    ],
  ];
  for (const [name, pattern] of cases) {
    const exit = await Effect.runPromiseExit(loadWeightsFile(fixture(name)));
    assert.ok(Exit.isFailure(exit), `${name} loaded`);
    assert.match(String(exit.cause), /TorchWeightsError/);
    assert.match(String(exit.cause), pattern);
  }
  assert.ok(Exit.isSuccess(await Effect.runPromiseExit(loadWeightsFile(fixture("resnet18.pth")))));
  const r = await runCli([
    "eval",
    "--checkpoint",
    fixture("resnet18_negative_var.pth"),
    "--method",
    "knn",
    "--train",
    "builtin:demo:train",
    "--test",
    "builtin:demo:test",
  ]);
  assert.match(oneError(r), /TorchWeightsError: .*running_var.*negative value -0\.5.*use another file/);
  assert.doesNotMatch(r.stdout, /top-1/);
});

const exportWith = (checkpoint: string, out: string, options: { format?: ExportFormat; head?: boolean }) =>
  Effect.runPromiseExit(
    exportCheckpointEncoder(checkpoint, out, undefined, options).pipe(
      Effect.provide(TensorBackend.layer("wasm")),
    ),
  );

Deno.test("export --head on a backbone-only file is refused (never random head and prototypes)", async () => {
  const dir = await Deno.makeTempDir();
  try {
    for (const format of ["safetensors", "onnx"] as const) {
      const out = `${dir}/backbone.${format}`;
      const exit = await exportWith(fixture("resnet18_backbone.pt"), out, { format, head: true });
      assert.ok(Exit.isFailure(exit), `${format}: exported`);
      assert.match(String(exit.cause), /resnet18_backbone\.pt holds no projection head or prototypes/);
      assert.throws(() => Deno.statSync(out), Deno.errors.NotFound);
    }
    // The same file without --head, and a file with a head with it, export.
    assert.ok(
      Exit.isSuccess(await exportWith(fixture("resnet18_backbone.pt"), `${dir}/b.onnx`, { format: "onnx" })),
    );
    const full = await exportWith(fixture("resnet18.pth"), `${dir}/h.safetensors`, {
      format: "safetensors",
      head: true,
    });
    assert.ok(Exit.isSuccess(full), String(full));
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("export never overwrites its input (also through a symlink or ..) and never writes through a symlink", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const input = `${dir}/model.pth`;
    await Deno.copyFile(fixture("resnet18.pth"), input);
    const original = await Deno.readFile(input);
    await Deno.symlink(input, `${dir}/link.pth`);
    await Deno.mkdir(`${dir}/sub`);
    for (const out of [input, `${dir}/link.pth`, `${dir}/sub/../model.pth`]) {
      const exit = await exportWith(input, out, { format: "safetensors" });
      assert.ok(Exit.isFailure(exit), `--out ${out} was written`);
      assert.match(String(exit.cause), /would overwrite the checkpoint it exports/);
      assert.deepEqual(await Deno.readFile(input), original);
    }
    // A TF.js export folder exported into itself.
    assert.ok(Exit.isSuccess(await exportWith(input, `${dir}/tfjs`, {})));
    const again = await exportWith(`${dir}/tfjs`, `${dir}/tfjs`, {});
    assert.ok(Exit.isFailure(again));
    assert.match(String(again.cause), /would overwrite the checkpoint/);

    // A symlink at the destination is replaced by the new file; what it pointed to is untouched.
    await Deno.writeTextFile(`${dir}/victim`, "keep me");
    await Deno.symlink(`${dir}/victim`, `${dir}/out.safetensors`);
    await Deno.mkdir(`${dir}/tfjs2`);
    await Deno.symlink(`${dir}/victim`, `${dir}/tfjs2/weights.bin`);
    assert.ok(Exit.isSuccess(await exportWith(input, `${dir}/out.safetensors`, { format: "safetensors" })));
    assert.ok(Exit.isSuccess(await exportWith(input, `${dir}/tfjs2`, {})));
    assert.equal(await Deno.readTextFile(`${dir}/victim`), "keep me");
    assert.ok(!Deno.lstatSync(`${dir}/out.safetensors`).isSymlink);
    assert.ok(!Deno.lstatSync(`${dir}/tfjs2/weights.bin`).isSymlink);
    assert.deepEqual(
      [...Deno.readDirSync(dir)].filter((e) => e.name.endsWith(".tmp")),
      [],
      "a temp file was left",
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("--labels: a name matching files in two classes is refused naming both; its class folder picks one", async () => {
  const paths = ["/d/train/cat/0001.png", "/d/train/dog/0001.png", "/d/train/dog/0002.png"];
  const error = await Effect.runPromise(
    Effect.flip(subsetFromNames(paths, ["0002.png", "0001.png"], "l.txt")),
  );
  assert.match(
    error.message,
    /^--labels l\.txt: "0001\.png" matches two samples, \/d\/train\/cat\/0001\.png and \/d\/train\/dog\/0001\.png: /,
  );
  assert.deepEqual(await Effect.runPromise(subsetFromNames(paths, ["dog/0001.png", "0002.png"], "l.txt")), [
    1,
    2,
  ]);
  assert.deepEqual(await Effect.runPromise(subsetFromNames(paths, ["/d/train/cat/0001.png"], "l.txt")), [0]);
  const partial = await Effect.runPromise(Effect.flip(subsetFromNames(paths, ["at/0001.png"], "l.txt")));
  assert.match(partial.message, /not in the train source/, "a suffix matches whole path components only");
});

Deno.test("eval --json on other sources records them and never replaces the run's own eval-knn.json", async () => {
  const data = await writeTinyData();
  const other = await writeTinyData();
  const run = await Deno.makeTempDir();
  try {
    await tinyRun(data, run, { epochs: 1, maxSteps: 2, knnEvery: 0 });
    const evalAndRecord = (sources: { train?: string; test?: string }) =>
      Effect.runPromise(
        Effect.flatMap(
          evaluate({ checkpoint: run, method: "knn", k: 5, ...sources }),
          (result) => writeEvalRecord(evaluationJson(result)),
        ).pipe(Effect.provide(TensorBackend.layer("wasm"))),
      );
    const own = await evalAndRecord({});
    assert.equal(own, `${run}/eval-knn.json`);
    const ownText = await Deno.readTextFile(own!);
    const ownJson = JSON.parse(ownText);
    assert.equal(ownJson.own_splits, true);
    assert.equal(ownJson.train_source, `${data}:train`);
    assert.equal(ownJson.test_source, `${data}:test`);

    const elsewhere = await evalAndRecord({ train: `${other}:train`, test: `${other}:test` });
    assert.match(elsewhere!, /\/eval-knn-[0-9a-f]{8}\.json$/);
    assert.equal(await Deno.readTextFile(own!), ownText, "the run's own evaluation was replaced");
    const json = JSON.parse(await Deno.readTextFile(elsewhere!));
    assert.equal(json.own_splits, false);
    assert.equal(json.train_source, `${other}:train`);
    assert.equal(json.test_source, `${other}:test`);
    // The same sources again keep to their file; the run's own splits named explicitly are its own.
    assert.equal(await evalAndRecord({ train: `${other}:train`, test: `${other}:test` }), elsewhere);
    assert.equal(await evalAndRecord({ train: `${data}:train`, test: `${data}:test` }), own);
  } finally {
    for (const dir of [data, other, run]) await Deno.remove(dir, { recursive: true });
  }
});
