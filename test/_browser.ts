/**
 * A real headless Chromium driven over the Chrome DevTools Protocol (its websocket), for the
 * report's browser test. No download: the Debian package (`chromium-headless-shell` or `chromium`).
 */
import { browserPath } from "./_optional.ts";

/** The Debian browser on PATH (test/_optional.ts decides whether a test that needs it runs). */
export const findBrowser = (): string | undefined => browserPath();

export interface PageResult {
  readonly errors: string[];
  readonly value: unknown;
  readonly screenshot: Uint8Array;
}

/**
 * Opens `url`, waits for its load event, evaluates `expression` (JSON-serialisable result),
 * takes a viewport screenshot and collects console errors and uncaught exceptions.
 */
export const inspectPage = async (
  browser: string,
  url: string,
  expression: string,
  viewport = { width: 1000, height: 1300 },
): Promise<PageResult> => {
  const profile = await Deno.makeTempDir({ prefix: "swav-chromium-" });
  const child = new Deno.Command(browser, {
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
      `--user-data-dir=${profile}`,
      "--remote-debugging-port=0",
      "about:blank",
    ],
    stdout: "null",
    stderr: "piped",
  }).spawn();
  let socket: WebSocket | undefined;
  try {
    // "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/ID" on stderr.
    const reader = child.stderr.pipeThrough(new TextDecoderStream()).getReader();
    let text = "";
    let endpoint: string | undefined;
    const deadline = Date.now() + 30_000;
    while (endpoint === undefined && Date.now() < deadline) {
      const { value, done } = await reader.read();
      if (done) break;
      text += value;
      endpoint = /DevTools listening on (ws:\/\/\S+)/.exec(text)?.[1];
    }
    if (endpoint === undefined) throw new Error(`chromium did not start: ${text.slice(0, 500)}`);
    // Keep draining stderr so the browser never blocks on a full pipe.
    (async () => {
      while (!(await reader.read().catch(() => ({ done: true }))).done) { /* drain */ }
    })();

    const ws = new WebSocket(endpoint);
    socket = ws;
    await new Promise((resolve, reject) => {
      ws.onopen = resolve;
      ws.onerror = reject;
    });
    let nextId = 1;
    const pending = new Map<number, (message: Record<string, unknown>) => void>();
    const listeners: ((message: Record<string, unknown>) => void)[] = [];
    ws.onmessage = (event) => {
      const message = JSON.parse(event.data);
      if (typeof message.id === "number") pending.get(message.id)?.(message);
      else for (const listen of listeners) listen(message);
    };
    const send = (method: string, params: object = {}, sessionId?: string) =>
      new Promise<Record<string, unknown>>((resolve, reject) => {
        const id = nextId++;
        pending.set(id, (message) => {
          pending.delete(id);
          if (message.error !== undefined) reject(new Error(`${method}: ${JSON.stringify(message.error)}`));
          else resolve(message.result as Record<string, unknown>);
        });
        ws.send(JSON.stringify({ id, method, params, ...(sessionId === undefined ? {} : { sessionId }) }));
      });
    const errors: string[] = [];
    let loaded: () => void = () => {};
    const loadEvent = new Promise<void>((resolve) => loaded = resolve);
    listeners.push((message) => {
      // deno-lint-ignore no-explicit-any -- CDP event parameters, read loosely
      const params = message.params as Record<string, any> | undefined;
      if (message.method === "Runtime.consoleAPICalled" && params?.type === "error") {
        errors.push(
          `console.error: ${
            JSON.stringify(
              params.args?.map((a: { value?: unknown; description?: string }) => a.value ?? a.description),
            )
          }`,
        );
      } else if (message.method === "Runtime.exceptionThrown") {
        errors.push(
          `exception: ${params?.exceptionDetails?.exception?.description ?? params?.exceptionDetails?.text}`,
        );
      } else if (message.method === "Log.entryAdded" && params?.entry?.level === "error") {
        errors.push(`log: ${params.entry.text} ${params.entry.url ?? ""}`);
      } else if (message.method === "Page.loadEventFired") {
        loaded();
      }
    });
    const { targetId } = await send("Target.createTarget", { url: "about:blank" });
    const { sessionId } = await send("Target.attachToTarget", { targetId, flatten: true }) as {
      sessionId: string;
    };
    for (const domain of ["Runtime.enable", "Log.enable", "Page.enable"]) await send(domain, {}, sessionId);
    await send(
      "Emulation.setDeviceMetricsOverride",
      { ...viewport, deviceScaleFactor: 1, mobile: false },
      sessionId,
    );
    await send("Page.navigate", { url }, sessionId);
    await Promise.race([
      loadEvent,
      new Promise((_, reject) => setTimeout(() => reject(new Error("no load event")), 30_000)),
    ]);
    const evaluated = await send(
      "Runtime.evaluate",
      { expression, returnByValue: true, awaitPromise: true },
      sessionId,
    );
    const shot = await send("Page.captureScreenshot", { format: "png" }, sessionId);
    const screenshot = Uint8Array.from(atob(shot.data as string), (c) => c.charCodeAt(0));
    return { errors, value: (evaluated.result as { value: unknown }).value, screenshot };
  } finally {
    socket?.close();
    try {
      child.kill("SIGKILL");
    } catch {
      // already gone
    }
    await child.status;
    await Deno.remove(profile, { recursive: true }).catch(() => {});
  }
};
