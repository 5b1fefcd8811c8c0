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
import { loadWeightsFile } from "../pipelines/torch_weights.ts";
import { runCli } from "./_helpers.ts";

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
