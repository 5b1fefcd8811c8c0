/**
 * Where `report` writes and how `dashboard` listens: refusals are one line naming the file, port or
 * host, and the dashboard warns in one line when it is reachable from other machines.
 */
import assert from "node:assert/strict";
import { Effect, Exit } from "effect";
import { TensorBackend } from "../backend/tensor_backend.ts";
import { startDashboard } from "../cli/dashboard.ts";
import { writeReport } from "../cli/run_report.ts";

const wasm = TensorBackend.layer("wasm");

/** writeReport's result: the path written, or the failure's message. */
const report = async (folder: string, out?: string) => {
  const exit = await Effect.runPromiseExit(writeReport(folder, out).pipe(Effect.provide(wasm)));
  return Exit.isSuccess(exit) ? { path: exit.value } : { error: String(exit.cause) };
};
const refusal = (result: { path: string } | { error: string }): string => {
  assert.ok("error" in result, `written: ${JSON.stringify(result)}`);
  return result.error;
};

Deno.test("report writes only an .html file in an existing folder, and replaces only an earlier report", async () => {
  const root = await Deno.makeTempDir({ prefix: "swav-report-out-" });
  try {
    const run = `${root}/run`;
    await Deno.mkdir(run);
    await Deno.writeTextFile(`${run}/metrics.jsonl`, `{"step":1,"epoch":0,"loss":2}\n`);
    // The default, then again over its own report.
    assert.deepEqual(await report(run), { path: `${run}/report.html` });
    assert.deepEqual(await report(run), { path: `${run}/report.html` });
    assert.deepEqual(await report(run, `${root}/other.html`), { path: `${root}/other.html` });

    const notes = `${root}/notes.html`;
    await Deno.writeTextFile(notes, "my notes");
    await Deno.symlink(notes, `${root}/link.html`);
    await Deno.mkdir(`${root}/folder.html`);
    const refused: [string | undefined, RegExp, string?][] = [
      [
        `${root}/report.txt`,
        /--out .*report\.txt: the report is one HTML file: give a name ending in \.html/,
      ],
      [`${root}/missing/report.html`, /--out .*: the folder .*\/missing does not exist \(create it first\)/],
      [notes, /--out .*notes\.html: exists and is not a report written by this command: not replaced/],
      [`${root}/link.html`, /--out .*link\.html: exists and is a symlink: not replaced/],
      [`${root}/folder.html`, /--out .*folder\.html: exists and is a folder: not replaced/],
      [undefined, /RUN_DIR .*nothing: no such folder/, `${root}/nothing`],
      [undefined, /RUN_DIR .*notes\.html: not a folder/, notes],
    ];
    for (const [out, message, folder] of refused) {
      assert.match(refusal(await report(folder ?? run, out)), message);
    }
    assert.equal(await Deno.readTextFile(notes), "my notes");
    assert.equal((await Deno.lstat(`${root}/link.html`)).isSymlink, true);
    assert.deepEqual(
      [...Deno.readDirSync(root)].map((e) => e.name).sort(),
      ["folder.html", "link.html", "notes.html", "other.html", "run"],
    );
  } finally {
    await Deno.remove(root, { recursive: true });
  }
});

/** Runs `dashboard RUN_DIR ...args` until its first line on stdout or its exit (bounded). */
const dashboard = async (folder: string, args: string[]) => {
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", new URL("../cli/dashboard.ts", import.meta.url).pathname, folder, ...args],
    env: { NO_COLOR: "1", SWAV_BACKEND: "wasm" },
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const timer = setTimeout(() => child.kill("SIGKILL"), 90_000);
  let stdout = "";
  const reader = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
  while (!stdout.includes("\n")) {
    const { value, done } = await reader.read();
    if (done) break;
    stdout += value;
  }
  // Serving: stop it; failed: it has exited already.
  if (stdout.includes("dashboard of")) child.kill("SIGTERM");
  reader.releaseLock();
  await child.stdout.cancel().catch(() => {});
  const stderr = new TextDecoder().decode(await new Response(child.stderr).arrayBuffer());
  const status = await child.status;
  clearTimeout(timer);
  return { stdout, stderr: stderr.trim(), code: status.code };
};

Deno.test("dashboard: a bad --port, a port in use or an unavailable host is one line naming it, not an internal error", async () => {
  const folder = await Deno.makeTempDir({ prefix: "swav-dashboard-listen-" });
  const busy = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  try {
    const port = (busy.addr as Deno.NetAddr).port;
    const cases: [string[], RegExp][] = [
      [["--port", "abc"], /^error: DashboardError: --port "abc": not a port \(an integer from 0 to 65535/],
      [["--port", "70000"], /^error: DashboardError: --port "70000": not a port/],
      [["--port", "-1"], /^error: DashboardError: --port "-1": not a port/],
      [
        ["--port", String(port)],
        new RegExp(`^error: DashboardError: cannot listen on 127\\.0\\.0\\.1:${port}: the port is in use`),
      ],
      [
        ["--port", "0", "--host", "192.0.2.1"],
        /^error: DashboardError: cannot listen on 192\.0\.2\.1:0: 192\.0\.2\.1 is not an address of this machine/,
      ],
    ];
    const results = await Promise.all(cases.map(([args]) => dashboard(folder, args)));
    results.forEach((r, i) => {
      assert.equal(r.code, 1, `${cases[i]![0]}: ${r.stderr}`);
      assert.equal(r.stderr.split("\n").length, 1, r.stderr);
      assert.match(r.stderr, cases[i]![1]);
      assert.doesNotMatch(r.stderr, /internal error/);
    });
  } finally {
    busy.close();
    await Deno.remove(folder, { recursive: true });
  }
});

Deno.test("dashboard --host 0.0.0.0 warns in one line that the run is readable from the network; 127.0.0.1 does not", async () => {
  const folder = await Deno.makeTempDir({ prefix: "swav-dashboard-listen-" });
  try {
    const [open, local] = await Promise.all([
      dashboard(folder, ["--port", "0", "--host", "0.0.0.0"]),
      dashboard(folder, ["--port", "0"]),
    ]);
    assert.match(open.stdout, /^dashboard of .* at http:\/\/0\.0\.0\.0:\d+\//);
    assert.match(
      open.stderr,
      /^warning: the dashboard listens on 0\.0\.0\.0 \(every network interface\), port \d+: anyone who can reach this machine/,
    );
    assert.equal(open.stderr.split("\n").length, 1, open.stderr);
    assert.match(local.stdout, /^dashboard of .* at http:\/\/127\.0\.0\.1:\d+\//);
    assert.equal(local.stderr, "");
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
});

Deno.test("dashboard events: a long metrics.jsonl is followed from its last MiB, never sent whole", async () => {
  const folder = await Deno.makeTempDir({ prefix: "swav-dashboard-long-" });
  const line = (step: number) =>
    JSON.stringify({ step, epoch: 0, loss: 1, lr: 0.1, pad: "x".repeat(200) }) + "\n";
  const lines = 40_000; // about 10 MB
  await Deno.writeTextFile(
    `${folder}/metrics.jsonl`,
    Array.from({ length: lines }, (_, i) => line(i + 1)).join(""),
  );
  const server = startDashboard(
    folder,
    { port: 0, pollMs: 50 },
    () => Promise.reject(new Error("no model views")),
  );
  const controller = new AbortController();
  try {
    const response = await fetch(`${server.url}events`, { signal: controller.signal });
    const reader = response.body!.pipeThrough(new TextDecoderStream()).getReader();
    let text = "";
    const batches = () =>
      [...text.matchAll(/event: metrics\ndata: (.*)\n\n/g)].map((m) =>
        JSON.parse(m[1]!) as { step: number }[]
      );
    while (batches().length < 1) text += (await reader.read()).value ?? "";
    const first = batches()[0]!;
    assert.ok(first.length < 5000, `${first.length} rows in the first event`);
    assert.equal(first.at(-1)!.step, lines);
    assert.deepEqual(
      first.map((r) => r.step),
      Array.from({ length: first.length }, (_, i) => lines - first.length + 1 + i),
    );
    await Deno.writeTextFile(`${folder}/metrics.jsonl`, line(lines + 1), { append: true });
    while (batches().length < 2) text += (await reader.read()).value ?? "";
    assert.deepEqual(batches()[1]!.map((r) => r.step), [lines + 1]);
    await reader.cancel();
  } finally {
    controller.abort();
    await server.shutdown();
    await Deno.remove(folder, { recursive: true });
  }
});
