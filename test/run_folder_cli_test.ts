/**
 * Run folder ownership through the command line (issue 18): a second pretrain
 * into a busy folder is refused in one line naming the holder, the trainer dies
 * with npm's Node wrapper (and frees the folder), an unusable --out is one line.
 */
import assert from "node:assert/strict";
import { writeDemoDataset } from "../data/demo_dataset.ts";
import { LOCK_FILE } from "../pipelines/run_folder.ts";

const root = new URL("..", import.meta.url).pathname;
const cli = `${root}cli/main.ts`;
const wrapper = `${root}node_modules/.bin/deno`;
const env = { NO_COLOR: "1", SWAV_BACKEND: "wasm", SWAV_THREADS: "2" };
/**
 * The native kernels' and the JPEG decoder's libraries named as missing files: the start-of-run hint (`hint: apt-get install
 * ...`) then comes on every machine, so the tests below expect it instead of depending on what this
 * machine has.
 */
const withoutOptionalLibraries = {
  ...env,
  SWAV_BLAS_LIB: "/nonexistent/libopenblas.so.0",
  SWAV_DNNL_LIB: "/nonexistent/libdnnl.so.2",
  SWAV_TURBOJPEG_LIB: "/nonexistent/libturbojpeg.so.0",
};

/** stderr's lines: the start-of-run hint first, then the rest (asserted present). */
const afterHint = (stderr: string): string[] => {
  const [hint, ...rest] = stderr.trim().split("\n");
  // libjpeg-turbo too where the data may hold JPEG files (an image folder), not for builtin:demo.
  assert.match(
    hint ?? "",
    /^hint: `apt-get install libopenblas0-pthread libdnnl2( libturbojpeg0)?` for /,
    stderr,
  );
  return rest;
};

/** Runs the CLI to its end (killed after `limitMs`); code, output and how long it took. */
const swav = async (args: string[], limitMs = 60_000) => {
  const started = Date.now();
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "--allow-all", cli, ...args],
    env: withoutOptionalLibraries,
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const timer = setTimeout(() => child.kill("SIGKILL"), limitMs);
  const output = await child.output();
  clearTimeout(timer);
  return {
    code: output.code,
    seconds: (Date.now() - started) / 1000,
    stderr: new TextDecoder().decode(output.stderr),
  };
};

/** A tiny data set and a config training for a long time (stopped by the test). */
const writeLongRun = async (folder: string) => {
  await writeDemoDataset({ folder: `${folder}/data`, perClassTrain: 2, perClassTest: 1, size: 16, seed: 7 });
  await Deno.writeTextFile(
    `${folder}/long.json`,
    JSON.stringify({
      data: { source: `${folder}/data:train`, workers: 0 },
      multicrop: { nmbCrops: [2], sizeCrops: [16], minScaleCrops: [0.3], maxScaleCrops: [1], blur: false },
      model: { arch: "resnet18", width: 4, stem: "cifar", hidden: 16, out: 8, prototypes: 20 },
      swav: { queueLength: 0 },
      train: { epochs: 100000, batchSize: 8 },
    }),
  );
  return `${folder}/long.json`;
};

const hasMetrics = (out: string) => {
  try {
    return Deno.readTextFileSync(`${out}/metrics.jsonl`).includes("\n");
  } catch {
    return false;
  }
};

const waitFor = async (what: string, ok: () => boolean, ms = 60_000) => {
  const deadline = Date.now() + ms;
  while (!ok()) {
    if (Date.now() > deadline) assert.fail(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
};

/** A process that exists and is not a zombie. */
const running = (pid: number): boolean => {
  try {
    const stat = Deno.readTextFileSync(`/proc/${pid}/stat`);
    return stat.slice(stat.lastIndexOf(")") + 2)[0] !== "Z";
  } catch {
    return false;
  }
};

const childrenOf = (pid: number): number[] =>
  [...Deno.readDirSync("/proc")].filter((e) => /^\d+$/.test(e.name)).flatMap((e) => {
    try {
      const stat = Deno.readTextFileSync(`/proc/${e.name}/stat`);
      return Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1]) === pid ? [Number(e.name)] : [];
    } catch {
      return [];
    }
  });

const lockIsFree = async (out: string): Promise<boolean> => {
  const file = await Deno.open(`${out}/${LOCK_FILE}`, { read: true, write: true });
  try {
    return await file.tryLock(true);
  } finally {
    file.close();
  }
};

Deno.test("pretrain CLI: a second run into a busy folder exits 1 within seconds, one line naming the holder", async () => {
  const folder = await Deno.makeTempDir();
  const config = await writeLongRun(folder);
  const first = new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "--allow-all",
      cli,
      "pretrain",
      "--config",
      config,
      "--out",
      `${folder}/run`,
      "--seed",
      "1",
    ],
    env,
    stdout: "null",
    stderr: "null",
  }).spawn();
  try {
    await waitFor("the first run's metrics", () => hasMetrics(`${folder}/run`));
    const second = await swav(
      ["pretrain", "--config", config, "--out", `${folder}/run`, "--seed", "2"],
      40_000,
    );
    assert.equal(second.code, 1, second.stderr);
    assert.ok(second.seconds < 30, `refused only after ${second.seconds} s`);
    // Refused before the backend starts, so before the start-of-run hint: the error is the only line.
    const lines = second.stderr.trim().split("\n");
    assert.equal(lines.length, 1, second.stderr);
    assert.match(
      lines[0]!,
      new RegExp(`^error: RunFolderBusy: run folder .* is in use by process ${first.pid}\\b`),
    );
    assert.equal(
      JSON.parse(Deno.readTextFileSync(`${folder}/run/seed.json`)).seed,
      1,
      "seed.json is the owner's",
    );
  } finally {
    first.kill("SIGKILL");
    await first.status;
    await Deno.remove(folder, { recursive: true });
  }
});

Deno.test("pretrain CLI: kill -9 of npm's Node wrapper stops the trainer and frees the run folder", async () => {
  const folder = await Deno.makeTempDir();
  const config = await writeLongRun(folder);
  const child = new Deno.Command(wrapper, {
    args: ["run", "--allow-all", cli, "pretrain", "--config", config, "--out", `${folder}/run`],
    env,
    stdout: "null",
    stderr: "null",
  }).spawn();
  let trainers: number[] = [];
  try {
    await waitFor("the trainer's metrics", () => hasMetrics(`${folder}/run`));
    trainers = childrenOf(child.pid);
    assert.ok(trainers.length > 0, "the wrapper started a trainer");
    Deno.kill(child.pid, "SIGKILL");
    await child.status;
    await waitFor("the trainer to stop", () => !trainers.some(running), 15_000);
    assert.ok(await lockIsFree(`${folder}/run`), "the run folder's lock is free again");
  } finally {
    for (const pid of trainers.filter(running)) Deno.kill(pid, "SIGKILL");
    await Deno.remove(folder, { recursive: true });
  }
});

Deno.test("pretrain CLI: an unusable --out is one line (RunFolderUnusable), exit code 1", async () => {
  const folder = await Deno.makeTempDir();
  try {
    await Deno.writeTextFile(`${folder}/file`, "x");
    for (const out of [`${folder}/file`, `${folder}/file/run`]) {
      const r = await swav(["pretrain", "--data", "builtin:demo", "--out", out, "--max-steps", "1"]);
      assert.equal(r.code, 1, r.stderr);
      const lines = afterHint(r.stderr);
      assert.equal(lines.length, 1, r.stderr);
      assert.match(lines[0]!, /^error: RunFolderUnusable: cannot use run folder .*file/);
    }
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
});

Deno.test("pretrain CLI: a second run into a folder holding a run is one line naming it; --force moves it aside", async () => {
  const folder = await Deno.makeTempDir();
  try {
    const config = await writeLongRun(folder);
    const out = `${folder}/run`;
    const first = await swav(["pretrain", "--config", config, "--out", out, "--max-steps", "2"]);
    assert.equal(first.code, 0, first.stderr);
    const config1 = await Deno.readTextFile(`${out}/config.json`);
    const again = await swav([
      "pretrain",
      "--config",
      config,
      "--out",
      out,
      "--max-steps",
      "1",
      "--seed",
      "9",
    ]);
    assert.equal(again.code, 1, again.stderr);
    const lines = again.stderr.trim().split("\n");
    assert.equal(lines.length, 1, again.stderr);
    assert.match(
      lines[0]!,
      /^error: RunFolderHoldsRun: run folder .*run already holds a run \(config\.json.*checkpoint-000000002\.swav\): .*--resume.*another --out.*--force/,
    );
    assert.equal(await Deno.readTextFile(`${out}/config.json`), config1, "config.json was replaced");
    // With --procs the launching process refuses it before any rank starts: one line, no rank's.
    const procs = await swav(["pretrain", "--config", config, "--out", out, "--procs", "2"]);
    assert.equal(procs.code, 1, procs.stderr);
    assert.match(procs.stderr.trim(), /^error: RunFolderHoldsRun: [^\n]*$/);
    const both = await swav(["pretrain", "--config", config, "--out", out, "--resume", "--force"]);
    assert.equal(both.code, 1, both.stderr);
    assert.match(both.stderr, /^error: ResumeWithForce: /);
    const forced = await swav(["pretrain", "--config", config, "--out", out, "--max-steps", "1", "--force"]);
    assert.equal(forced.code, 0, forced.stderr);
    assert.match(forced.stderr, /earlier run in .*run was moved into .*run\/previous-1/);
    assert.equal(await Deno.readTextFile(`${out}/previous-1/config.json`), config1);
    assert.ok(Deno.statSync(`${out}/previous-1/checkpoint-000000002.swav`).isFile);
    assert.ok(Deno.statSync(`${out}/checkpoint-000000001.swav`).isFile);
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
});
