import assert from "node:assert/strict";
import { Effect } from "effect";
import { TensorBackend } from "../backend/tensor_backend.ts";
import { startDashboard } from "../cli/dashboard.ts";
import { tinyRun, tinyRunConfig, writeTinyData } from "./_tiny_run.ts";

// The dashboard renders beside the training run, on the backend that run started: a second
// `TensorBackend.layer` would dispose every tf.Variable on release, the training run's included.
const wasm = TensorBackend.withSettings({});
const runWithBackend = <A>(effect: Effect.Effect<A, unknown, TensorBackend>) =>
  Effect.runPromise(effect.pipe(Effect.provide(wasm)));

/** The status code of a raw request line, so the path reaches the server exactly as written. */
const rawStatus = async (port: number, target: string): Promise<number> => {
  const conn = await Deno.connect({ hostname: "127.0.0.1", port });
  await conn.write(
    new TextEncoder().encode(`GET ${target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n`),
  );
  const buffer = new Uint8Array(256);
  const n = await conn.read(buffer);
  conn.close();
  const status = /^HTTP\/1\.1 (\d{3})/.exec(new TextDecoder().decode(buffer.subarray(0, n ?? 0)));
  return Number(status?.[1] ?? 0);
};

/** Reads server-sent events until `until` says stop or the deadline passes (bounded). */
const readEvents = async (
  url: string,
  until: (events: { event: string; data: unknown }[]) => boolean,
  ms = 90_000,
) => {
  const controller = new AbortController();
  const timeout = setTimeout(() => controller.abort(), ms);
  const events: { event: string; data: unknown }[] = [];
  try {
    const response = await fetch(url, { signal: controller.signal });
    const reader = response.body!.pipeThrough(new TextDecoderStream()).getReader();
    let text = "";
    while (!until(events)) {
      const { value, done } = await reader.read();
      if (done) break;
      text += value;
      let end;
      while ((end = text.indexOf("\n\n")) >= 0) {
        const block = text.slice(0, end);
        text = text.slice(end + 2);
        const event = /^event: (.*)$/m.exec(block)?.[1] ?? "message";
        const data = /^data: (.*)$/m.exec(block)?.[1];
        events.push({ event, data: data === undefined ? undefined : JSON.parse(data) });
      }
    }
    await reader.cancel();
  } catch (error) {
    if (!controller.signal.aborted) throw error;
  } finally {
    clearTimeout(timeout);
  }
  return events;
};

Deno.test("the dashboard follows a training run live, serves only the run folder, and binds 127.0.0.1", async () => {
  const data = await writeTinyData();
  const out = await Deno.makeTempDir({ prefix: "swav-dashboard-run-" });
  const dashboard = startDashboard(out, { port: 0, pollMs: 100 }, runWithBackend);
  try {
    assert.equal(dashboard.host, "127.0.0.1");
    assert.match(dashboard.url, /^http:\/\/127\.0\.0\.1:\d+\/$/);
    const training = tinyRun(data, out, { epochs: 4 });
    // New points arrive while the run trains: metrics events with growing steps, in more than one event.
    const events = await readEvents(`${dashboard.url}events`, (events) => {
      const steps = events.filter((e) => e.event === "metrics").flatMap((
        e,
      ) => (e.data as { step: number }[]));
      return events.filter((e) => e.event === "metrics").length >= 2 && steps.length >= 10;
    });
    const batches = events.filter((e) => e.event === "metrics").map((e) => (e.data as { step: number }[]));
    assert.ok(batches.length >= 2, `metrics events: ${JSON.stringify(events).slice(0, 300)}`);
    const steps = batches.flat().map((m) => m.step);
    assert.deepEqual(steps, [...steps].sort((a, b) => a - b));
    assert.ok(steps.at(-1)! > steps[0]!);
    // The page while it trains.
    const page = await fetch(dashboard.url);
    assert.equal(page.status, 200);
    const html = await page.text();
    assert.match(html, /<svg /);
    assert.match(html, /new EventSource\("events"\)/);
    await training;
    const curves = await fetch(`${dashboard.url}fragment/curves`);
    assert.match(await curves.text(), /<svg /);

    // Nothing outside the run folder.
    await Deno.symlink("/etc/hostname", `${out}/link-out`);
    await Deno.symlink("/etc", `${out}/dir-out`);
    assert.equal(await rawStatus(dashboard.port, "/files/config.json"), 200);
    for (
      const target of [
        "/files/../../../../etc/hostname",
        "/files/%2e%2e/%2e%2e/%2e%2e/etc/hostname",
        "/files/..%2F..%2F..%2F..%2Fetc%2Fhostname",
        "/files/%2Fetc%2Fhostname",
        "//etc/hostname",
        "/files//etc/hostname",
        "/files/link-out",
        "/files/dir-out/hostname",
        "/files/",
        "/files/%00",
        "/etc/hostname",
      ]
    ) {
      assert.equal(await rawStatus(dashboard.port, target), 404, target);
    }

    // Truncated under it: the stream starts again; deleted: the page still answers.
    await Deno.writeTextFile(`${out}/metrics.jsonl`, "");
    const reset = await readEvents(`${dashboard.url}events`, (events) => events.length > 0, 1500);
    assert.equal(reset.length, 0);
    await Deno.remove(out, { recursive: true });
    const gone = await fetch(dashboard.url);
    assert.equal(gone.status, 200);
    assert.match(await gone.text(), /no steps yet/);
    assert.equal((await fetch(`${dashboard.url}fragment/curves`)).status, 200);
  } finally {
    await dashboard.shutdown();
    await Deno.remove(out, { recursive: true }).catch(() => {});
    await Deno.remove(data, { recursive: true });
  }
});

Deno.test("pretrain --dashboard prints a 127.0.0.1 URL that serves the live page while the run trains", async () => {
  const data = await writeTinyData();
  const folder = await Deno.makeTempDir({ prefix: "swav-dashboard-cli-" });
  try {
    await Deno.writeTextFile(
      `${folder}/run.json`,
      JSON.stringify(tinyRunConfig(data, `${folder}/run`, { epochs: 30, knnEvery: 0 })),
    );
    const child = new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        "-A",
        new URL("../cli/main.ts", import.meta.url).pathname,
        "pretrain",
        "--config",
        `${folder}/run.json`,
        "--dashboard",
      ],
      env: { NO_COLOR: "1", SWAV_BACKEND: "wasm", SWAV_THREADS: "2" },
      stdout: "null",
      stderr: "piped",
    }).spawn();
    try {
      // The URL line comes before the first step; read stderr until it shows (bounded).
      const reader = child.stderr.pipeThrough(new TextDecoderStream()).getReader();
      let text = "";
      const deadline = Date.now() + 60_000;
      while (!/dashboard: (http:\/\/\S+)/.test(text) && Date.now() < deadline) {
        const { value, done } = await reader.read();
        if (done) break;
        text += value;
      }
      const url = /dashboard: (http:\/\/\S+)/.exec(text)?.[1];
      assert.ok(url !== undefined, `no dashboard URL on stderr: ${text.slice(-400)}`);
      assert.ok(url.startsWith("http://127.0.0.1:"), url);
      const page = await fetch(url);
      assert.equal(page.status, 200);
      assert.match(await page.text(), /<html/i);
      reader.releaseLock();
    } finally {
      child.kill("SIGKILL");
      await child.status;
      await child.stderr.cancel().catch(() => {});
    }
  } finally {
    await Deno.remove(folder, { recursive: true });
    await Deno.remove(data, { recursive: true });
  }
});
