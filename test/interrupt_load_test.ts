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

const spawn = (args: string[]) =>
  new Deno.Command(Deno.execPath(), {
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
