/**
 * Ctrl-C during a long checkpoint load: the real deno binary runs `swav export` on a valid but
 * slow-to-load PyTorch checkpoint (bench/hostile_checkpoints.ts `slowToLoad`: transposed tensors
 * of deflated zeros, 200 KB on disk, many seconds to inflate and convert), gets SIGINT once the
 * load has begun, and must end within a few seconds, writing nothing. The old reader parsed
 * synchronously: the event loop was blocked, so the CLI's signal handler ran only after the
 * whole load.
 */
import assert from "node:assert/strict";
import { slowToLoad } from "../bench/hostile_checkpoints.ts";

const cli = new URL("../cli/main.ts", import.meta.url).pathname;
const env = { NO_COLOR: "1", SWAV_BACKEND: "wasm", SWAV_THREADS: "1" };

const wrapper = new URL("../node_modules/.bin/deno", import.meta.url).pathname;

const spawn = (args: string[], program = Deno.execPath()) =>
  new Deno.Command(program, {
    args: ["run", "--allow-all", cli, ...args],
    env,
    stdout: "piped",
    stderr: "piped",
  }).spawn();

Deno.test("SIGINT ends a long PyTorch checkpoint load within seconds", async () => {
  const folder = await Deno.makeTempDir({ prefix: "swav-interrupt-" });
  try {
    // How long the CLI takes to start and reach the checkpoint: a missing file fails right there.
    const startedProbe = performance.now();
    const probe = await spawn(["export", "--checkpoint", `${folder}/missing.pth`, "--out", `${folder}/x`])
      .output();
    const startup = performance.now() - startedProbe;
    assert.equal(probe.code, 1, new TextDecoder().decode(probe.stderr));

    const file = `${folder}/slow.pth`;
    await Deno.writeFile(file, slowToLoad(3, 4096));
    const child = spawn(["export", "--checkpoint", file, "--out", `${folder}/out`]);
    // Signal one second into the load (the load itself takes well over ten seconds on this file).
    await new Promise((resolve) => setTimeout(resolve, startup + 1000));
    const signalled = performance.now();
    child.kill("SIGINT");
    const timer = setTimeout(() => child.kill("SIGKILL"), 60_000);
    const out = await child.output();
    clearTimeout(timer);
    const seconds = (performance.now() - signalled) / 1000;
    const stderr = new TextDecoder().decode(out.stderr);
    // Generous: it ends within a second of the signal when nothing else loads the machine.
    assert.ok(seconds < 6, `ended ${seconds.toFixed(1)} s after SIGINT (${stderr.trim()})`);
    assert.notEqual(out.code, 0, "an interrupted export does not report success");
    assert.ok(!/\n\s+at /.test(stderr), stderr);
    await assert.rejects(Deno.stat(`${folder}/out/model.json`), Deno.errors.NotFound, "nothing exported");
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
});

/** The processes whose parent is `pid`. */
const childrenOf = (pid: number): number[] =>
  [...Deno.readDirSync("/proc")].filter((e) => /^\d+$/.test(e.name)).flatMap((e) => {
    try {
      const stat = Deno.readTextFileSync(`/proc/${e.name}/stat`);
      return Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1]) === pid ? [Number(e.name)] : [];
    } catch {
      return [];
    }
  });
const alive = (pid: number) => {
  try {
    return !/\) Z /.test(Deno.readTextFileSync(`/proc/${pid}/stat`));
  } catch {
    return false;
  }
};

Deno.test({
  name: "kill -9 of npm's wrapper during a long export load ends the Deno process too",
  ignore: Deno.build.os !== "linux",
  fn: async () => {
    const folder = await Deno.makeTempDir({ prefix: "swav-orphan-" });
    try {
      const startedProbe = performance.now();
      await spawn(["export", "--checkpoint", `${folder}/missing.pth`, "--out", `${folder}/x`], wrapper)
        .output();
      const startup = performance.now() - startedProbe;
      await Deno.writeFile(`${folder}/slow.pth`, slowToLoad(3, 4096));
      // No pipes: reading them would wait for the Deno process, which holds them too.
      const child = new Deno.Command(wrapper, {
        args: [
          "run",
          "--allow-all",
          cli,
          "export",
          "--checkpoint",
          `${folder}/slow.pth`,
          "--out",
          `${folder}/out`,
        ],
        env,
        stdout: "null",
        stderr: "null",
      }).spawn();
      await new Promise((resolve) => setTimeout(resolve, startup + 1500));
      const loaders = childrenOf(child.pid);
      assert.ok(loaders.length > 0, "the wrapper started deno");
      child.kill("SIGKILL");
      await child.status;
      // The watch checks its parent once a second; the load yields, so its SIGINT is handled at once.
      const deadline = Date.now() + 8000;
      while (Date.now() < deadline && loaders.some(alive)) await new Promise((r) => setTimeout(r, 200));
      const orphans = loaders.filter(alive);
      for (const pid of orphans) Deno.kill(pid, "SIGKILL");
      assert.deepEqual(orphans, [], "no deno process outlives the wrapper by 8 s");
    } finally {
      await Deno.remove(folder, { recursive: true });
    }
  },
});
