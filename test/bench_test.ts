/**
 * `bench/bench.ts --json --stage sinkhorn --reps 1` prints one valid JSON line
 * with the stage's median time and throughput; bad flags fail with a message.
 */
import assert from "node:assert/strict";
import { parseBenchArgs, parseCrops, stageNames } from "../bench/bench.ts";

const runBench = async (args: string[]) => {
  const out = await new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "--allow-read",
      "--allow-write",
      "--allow-env",
      "--allow-ffi",
      "--allow-sys",
      new URL("../bench/bench.ts", import.meta.url).pathname,
      ...args,
    ],
    stdout: "piped",
    stderr: "piped",
  }).output();
  return {
    code: out.code,
    stdout: new TextDecoder().decode(out.stdout),
    stderr: new TextDecoder().decode(out.stderr),
  };
};

Deno.test("bench --json --stage sinkhorn prints one JSON line", async () => {
  // A small model keeps the set-up fast; the sinkhorn stage runs on [2 x batch, prototypes] scores.
  const { code, stdout, stderr } = await runBench([
    "--json",
    "--stage",
    "sinkhorn",
    "--reps",
    "1",
    "--width",
    "4",
    "--batch",
    "8",
    "--hidden",
    "32",
    "--prototypes",
    "50",
  ]);
  assert.equal(code, 0, stderr);
  const lines = stdout.trim().split("\n");
  assert.equal(lines.length, 1, `expected one line, got:\n${stdout}`);
  const record = JSON.parse(lines[0]!);
  assert.equal(record.stage, "sinkhorn");
  assert.ok(record.ms > 0 && Number.isFinite(record.ms), `ms ${record.ms}`);
  assert.ok(Math.abs(record.images_per_s - 8 / (record.ms / 1000)) < 0.01 * record.images_per_s);
});

Deno.test("bench flags are validated", async (t) => {
  await t.step("crops parse as COUNTxSIZE groups", () => {
    assert.deepEqual(parseCrops("2x32+4x16"), [[2, 32], [4, 16]]);
    assert.throws(() => parseCrops("2x"), /COUNTxSIZE/);
  });
  await t.step("defaults are the benchmark configuration", () => {
    const o = parseBenchArgs([]);
    assert.deepEqual(
      [o.arch, o.width, o.batch, o.crops, o.hidden, o.out, o.prototypes],
      ["resnet18", 16, 64, [[2, 32]], 2048, 128, 3000],
    );
    assert.deepEqual(o.stages, stageNames);
  });
  await t.step("unknown stage, flag or bad number fail with a message", async () => {
    assert.throws(() => parseBenchArgs(["--stage", "nope"]), /unknown stage 'nope'/);
    assert.throws(() => parseBenchArgs(["--frobnicate"]), /unknown flag/);
    assert.throws(() => parseBenchArgs(["--threads", "0"]), /--threads must be an integer >= 1/);
    const { code, stderr } = await runBench(["--stage", "nope"]);
    assert.equal(code, 2);
    assert.match(stderr, /unknown stage/);
  });
});
