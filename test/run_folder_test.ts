/**
 * Run folder ownership: one exclusive lock per folder, free again after the
 * holder ends (even by kill -9), unique temp names, and the trainer dies with
 * npm's Node wrapper.
 */
import assert from "node:assert/strict";
import { needsHardware } from "./_optional.ts";
import { Effect, Exit } from "effect";
import { LOCK_FILE, lockRunFolder, openMetricsLog } from "../pipelines/run_folder.ts";
import { chainIntact, launcherChain, parseStat } from "../cli/wrapper_watch.ts";

const denoBinary = Deno.execPath();

/** A child Deno process that takes the lock on `folder`, says so, then waits to be killed. */
const spawnHolder = (folder: string) => {
  const script = `
    import { Effect } from "effect";
    import { lockRunFolder } from "${new URL("../pipelines/run_folder.ts", import.meta.url).href}";
    setInterval(() => {}, 1000); // keeps the event loop (and so the lock) alive until killed
    await Effect.runPromise(Effect.scoped(Effect.gen(function* () {
      yield* lockRunFolder(${JSON.stringify(folder)});
      console.log("locked");
      yield* Effect.never;
    })));
  `;
  const child = new Deno.Command(denoBinary, {
    args: ["eval", "--quiet", script],
    cwd: new URL("..", import.meta.url).pathname,
    stdout: "piped",
    stderr: "inherit",
  }).spawn();
  return child;
};

const firstLine = async (stream: ReadableStream<Uint8Array>): Promise<string> => {
  const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
  let text = "";
  while (!text.includes("\n")) {
    const { value, done } = await reader.read();
    if (done) break;
    text += value;
  }
  reader.releaseLock();
  return text.trim();
};

Deno.test("a second owner of a run folder fails at once naming the holder; the lock is free after kill -9", async () => {
  const folder = await Deno.makeTempDir();
  const holder = spawnHolder(folder);
  try {
    assert.equal(await firstLine(holder.stdout), "locked");
    const started = performance.now();
    const exit = await Effect.runPromiseExit(Effect.scoped(lockRunFolder(folder)));
    assert.ok(performance.now() - started < 5000, "the second owner must not wait for the lock");
    assert.ok(Exit.isFailure(exit));
    const error = exit.cause.toString();
    assert.match(error, /RunFolderBusy/);
    assert.match(error, new RegExp(`in use by process ${holder.pid}`));
    holder.kill("SIGKILL");
    await holder.status;
    // The OS released the dead holder's lock: we can take it.
    setInterval(() => {}, 1000); // keeps the event loop (and so the lock) alive until killed
    await Effect.runPromise(Effect.scoped(lockRunFolder(folder)));
    const record = JSON.parse(await Deno.readTextFile(`${folder}/${LOCK_FILE}`));
    assert.equal(record.pid, Deno.pid);
  } finally {
    try {
      holder.kill("SIGKILL");
    } catch { /* already gone */ }
    await holder.stdout.cancel().catch(() => {});
    await Deno.remove(folder, { recursive: true });
  }
});

Deno.test("temp names are unique per owner, and the owner cleans leftover temp files", async () => {
  const folder = await Deno.makeTempDir();
  try {
    await Deno.writeTextFile(`${folder}/checkpoint-000000001.swav.999-dead.tmp`, "left by a crashed run");
    await Deno.writeTextFile(`${folder}/keep.json`, "{}");
    setInterval(() => {}, 1000); // keeps the event loop (and so the lock) alive until killed
    await Effect.runPromise(Effect.scoped(Effect.gen(function* () {
      const run = yield* lockRunFolder(folder);
      const a = run.tempPathFor(`${folder}/checkpoint-000000002.swav`);
      assert.ok(a.startsWith(`${folder}/checkpoint-000000002.swav.${Deno.pid}-`) && a.endsWith(".tmp"));
      yield* Effect.promise(() => Deno.writeTextFile(a, "half written"));
      yield* run.cleanTempFiles;
    })));
    const names = [];
    for await (const entry of Deno.readDir(folder)) names.push(entry.name);
    assert.deepEqual(names.sort(), [".lock", "keep.json"]);
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
});

Deno.test("an unusable run folder is a typed error naming it", async () => {
  const file = await Deno.makeTempFile();
  try {
    const exit = await Effect.runPromiseExit(Effect.scoped(lockRunFolder(`${file}/run`)));
    assert.ok(Exit.isFailure(exit));
    assert.match(exit.cause.toString(), /RunFolderUnusable/);
  } finally {
    await Deno.remove(file);
  }
});

Deno.test("parseStat reads pid, parent and a name with spaces and parentheses", () => {
  assert.deepEqual(parseStat("123 (my (odd) name) S 45 123 45 0 -1"), {
    pid: 123,
    ppid: 45,
    name: "my (odd) name",
  });
  assert.equal(parseStat("garbage"), undefined);
  assert.ok(chainIntact(launcherChain()));
});

const linux = needsHardware("linux");
Deno.test({
  name:
    `the trainer started through npm's Node wrapper dies when the wrapper is killed with -9 (${linux.what})`,
  ignore: linux.ignore,
  fn: async () => {
    const root = new URL("..", import.meta.url).pathname;
    const wrapper = `${root}node_modules/.bin/deno`;
    const dir = await Deno.makeTempDir();
    const script = `${dir}/orphan.ts`;
    await Deno.writeTextFile(
      script,
      `import { exitWithWrapper } from "${new URL("../cli/wrapper_watch.ts", import.meta.url).href}";
       Deno.addSignalListener("SIGINT", () => { Deno.writeTextFileSync("${dir}/stopped", "yes"); Deno.exit(130); });
       exitWithWrapper(undefined, 100);
       Deno.writeTextFileSync("${dir}/pid", String(Deno.pid));
       setInterval(() => {}, 1000);`,
    );
    const child = new Deno.Command("node", { args: [wrapper, "run", "-A", script], cwd: root }).spawn();
    try {
      let pid = 0;
      for (let i = 0; i < 200 && pid === 0; i++) {
        await new Promise((r) => setTimeout(r, 100));
        pid = Number(await Deno.readTextFile(`${dir}/pid`).catch(() => "0"));
      }
      assert.ok(pid > 0, "the Deno child started");
      child.kill("SIGKILL");
      await child.status;
      let alive = true;
      for (let i = 0; i < 50 && alive; i++) {
        await new Promise((r) => setTimeout(r, 100));
        alive = await Deno.stat(`/proc/${pid}`).then(() => true, () => false);
      }
      assert.ok(!alive, "the Deno process outlived its wrapper");
      assert.equal(await Deno.readTextFile(`${dir}/stopped`), "yes", "it stopped as on Ctrl-C");
    } finally {
      try {
        child.kill("SIGKILL");
      } catch { /* gone */ }
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test("a resumed run reads metrics.jsonl back through the bounded reader: a FIFO there is one error, not a hang", async () => {
  const folder = await Deno.makeTempDir();
  try {
    const mkfifo = await new Deno.Command("mkfifo", { args: [`${folder}/metrics.jsonl`] }).output();
    assert.ok(mkfifo.success, "mkfifo");
    const exit = await Effect.runPromiseExit(Effect.scoped(Effect.gen(function* () {
      const run = yield* lockRunFolder(folder);
      yield* openMetricsLog(run, 3);
    })));
    assert.ok(Exit.isFailure(exit));
    const error = exit.cause.toString();
    assert.match(error, /RunFolderUnusable/);
    assert.match(error, /metrics\.jsonl/);
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
});
