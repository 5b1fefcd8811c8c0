/**
 * The process knobs: `--procs` below 1 and a batch that does not split are one
 * line before any process starts; `--threads` is capped at the cores with a
 * warning (100000 crashed libgomp); a host file that made mpiexec crash is
 * refused naming its line; a launcher failure says what failed and promises a
 * checkpoint only where there is one.
 */
import assert from "node:assert/strict";
import { Effect, Exit } from "effect";
import { cappedThreads, checkHostfile, checkKnobs } from "../cli/knobs.ts";
import { launchFailureLine } from "../cli/launch.ts";
import { runCli } from "./_helpers.ts";
import { writeTinyData } from "./_tiny_run.ts";
import { tinyRunConfig } from "./_tiny_run.ts";

const failure = async (effect: Effect.Effect<unknown, unknown>) => {
  const exit = await Effect.runPromiseExit(effect);
  assert.ok(Exit.isFailure(exit), "expected a failure");
  return String(exit.cause);
};

const knobs = (over: object) =>
  checkKnobs({ procs: undefined, threads: undefined, hostfile: undefined, batchSize: 8, ...over }, 2);

Deno.test("checkKnobs: --procs and --threads below 1 and an uneven batch are refused; threads over the cores are capped", async () => {
  for (const procs of [0, -3]) {
    assert.match(
      await failure(knobs({ procs })),
      new RegExp(`--procs must be 1 or more processes, got ${procs}`),
    );
  }
  assert.match(await failure(knobs({ threads: 0 })), /--threads must be 1 or more threads, got 0/);
  assert.match(await failure(knobs({ procs: 3 })), /batchSize 8 does not split evenly over 3 processes/);
  assert.deepEqual(await Effect.runPromise(knobs({ procs: 4, threads: 2 })), { threads: 2 });
  const capped = await Effect.runPromise(knobs({ threads: 100000 }));
  assert.equal(capped.threads, 2);
  assert.match(capped.warning!, /threads: 100000 requested, capped at 2/);
  assert.deepEqual(cappedThreads(3, 0), { threads: 3 }, "an unknown core count caps nothing");
});

Deno.test("checkHostfile: host and host:slots lines pass; slots 0, '::::', an empty file, a FIFO are refused", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const write = async (name: string, text: string) => {
      await Deno.writeTextFile(`${dir}/${name}`, text);
      return `${dir}/${name}`;
    };
    await Effect.runPromise(checkHostfile(await write("ok", "# two hosts\nnode-1:4\n10.0.0.2\n\n")));
    assert.match(
      await failure(checkHostfile(await write("zero", "localhost:0\n"))),
      /line 1 "localhost:0" is not/,
    );
    assert.match(await failure(checkHostfile(await write("colons", "a\n::::\n"))), /line 2 "::::" is not/);
    assert.match(await failure(checkHostfile(await write("empty", "# none\n"))), /names no host/);
    assert.match(await failure(checkHostfile(`${dir}/missing`)), /no such file/);
    new Deno.Command("mkfifo", { args: [`${dir}/fifo`] }).outputSync();
    assert.match(await failure(checkHostfile(`${dir}/fifo`)), /UnsafeFile/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("launchFailureLine: mpiexec killed by a signal is named with the host file; no checkpoint, no promise", () => {
  const crashed = launchFailureLine({
    procs: 2,
    code: 136,
    signal: "SIGFPE",
    hostfile: "hosts.txt",
    checkpoint: undefined,
  });
  assert.match(
    crashed,
    /^error: mpiexec itself was killed by SIGFPE \(exit code 136\).*check the host file hosts\.txt/,
  );
  assert.match(crashed, /holds no checkpoint to resume from$/);
  assert.doesNotMatch(crashed, /stays usable/);
  const stopped = launchFailureLine({
    procs: 2,
    code: 1,
    signal: null,
    hostfile: undefined,
    checkpoint: "checkpoint-000000004.swav",
  });
  assert.match(stopped, /job of 2 processes stopped \(mpiexec exit code 1;/);
  assert.match(stopped, /last checkpoint \(checkpoint-000000004\.swav\) stays usable: --resume continues$/);
});

Deno.test("pretrain CLI: bad --procs, an uneven batch and a bad host file are one line before any process starts; --threads 100000 is capped", async () => {
  const data = await writeTinyData();
  const dir = await Deno.makeTempDir();
  try {
    const config = `${dir}/tiny.json`;
    await Deno.writeTextFile(
      config,
      JSON.stringify(tinyRunConfig(data, `${dir}/unused`, { knnEvery: 0, batchSize: 16 })),
    );
    await Deno.writeTextFile(`${dir}/hosts`, "localhost:0\n");
    const cases: Array<[string[], RegExp]> = [
      [["--procs", "0"], /^error: InvalidFlag: --procs must be 1 or more processes, got 0$/],
      [["--procs", "-3"], /^error: InvalidFlag: --procs must be 1 or more processes, got -3$/],
      [
        ["--procs", "3"],
        /^error: DataParallelError: train.batchSize 16 does not split evenly over 3 processes/,
      ],
      [
        ["--procs", "2", "--hostfile", `${dir}/hosts`],
        /^error: InvalidFlag: --hostfile .*hosts: line 1 "localhost:0"/,
      ],
    ];
    for (const [flags, pattern] of cases) {
      const r = await runCli(["pretrain", "--config", config, "--out", `${dir}/run`, ...flags]);
      assert.equal(r.code, 1, r.stderr);
      const lines = r.stderr.trim().split("\n");
      assert.equal(lines.length, 1, `${flags.join(" ")}: ${r.stderr}`);
      assert.match(lines[0]!, pattern);
    }
    const threads = await runCli([
      "pretrain",
      "--config",
      config,
      "--out",
      `${dir}/threads`,
      "--threads",
      "100000",
      "--max-steps",
      "1",
      "--json",
    ]);
    assert.equal(threads.code, 0, threads.stderr);
    const cores = navigator.hardwareConcurrency;
    assert.match(threads.stderr, new RegExp(`warning: threads: 100000 requested, capped at ${cores}`));
    assert.equal(JSON.parse(threads.stdout.trim().split("\n").at(-1)!).steps, 1);
  } finally {
    await Deno.remove(dir, { recursive: true });
    await Deno.remove(data, { recursive: true });
  }
});
