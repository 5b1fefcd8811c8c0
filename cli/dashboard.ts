/**
 * `deno task dashboard RUN_DIR [--port N] [--host H]`: the run report served live by Deno.serve,
 * on 127.0.0.1 unless `--host` says otherwise (any other address: a one-line warning that the run is
 * readable from the network). It reads the run folder and, for the retrieval thumbnails, images of
 * the data source its config.json names (shrunk and inlined in the page; never served as files):
 *
 *   /                  the report page, with a script that follows the run
 *   /events            server-sent events: `metrics` (the new metrics.jsonl lines), `checkpoint`
 *   /fragment/curves   the curves, re-rendered from the records
 *   /fragment/events   the warnings
 *   /files/NAME        a file of the run folder (never one outside it: `..`, absolute paths and
 *                      symlinks out are 404)
 *
 * A run folder written, truncated or deleted under it is read as it is at each request.
 */
import { NodeRuntime, NodeServices } from "@effect/platform-node";
import { Effect, Option, Schema } from "effect";
import { Argument, Command, Flag } from "effect/cli";
import { TensorBackend } from "../backend/tensor_backend.ts";
import { latestCheckpoint } from "../pipelines/checkpoint.ts";
import { renderCurves, renderEvents, renderReport } from "../pipelines/report_html.ts";
import { computeModelViews, type ModelViews, readRunRecords } from "../pipelines/run_report.ts";
import { reportFailure } from "./report.ts";

export interface DashboardOptions {
  readonly port?: number;
  readonly host?: string;
  /** How often the run folder is polled for new lines (ms). */
  readonly pollMs?: number;
}

export interface Dashboard {
  readonly url: string;
  readonly host: string;
  readonly port: number;
  readonly shutdown: () => Promise<void>;
}

/** The dashboard could not start where it was asked to listen: the user's `--port` / `--host`. */
export class DashboardError extends Schema.TaggedError<DashboardError>()("DashboardError", {
  message: Schema.String,
}) {}

/** `--port` as given: an integer from 0 to 65535 (0 picks a free one). */
export const parsePort = (text: string): Effect.Effect<number, DashboardError> =>
  /^\d{1,5}$/.test(text.trim()) && Number(text) <= 65535 ? Effect.succeed(Number(text)) : Effect.fail(
    new DashboardError({
      message: `--port ${
        JSON.stringify(text).slice(0, 40)
      }: not a port (an integer from 0 to 65535; 0 picks a free one)`,
    }),
  );

/** Whether `host` is reachable from this machine only. */
export const isLoopback = (host: string): boolean =>
  host === "localhost" || host === "::1" || host === "[::1]" || /^127\.\d+\.\d+\.\d+$/.test(host);

/** The one-line warning for a dashboard reachable from other machines, or undefined on loopback. */
export const exposureWarning = (host: string, port: number): string | undefined =>
  isLoopback(host)
    ? undefined
    : `warning: the dashboard listens on ${host}${
      host === "0.0.0.0" || host === "::" ? " (every network interface)" : ""
    }, port ${port}: anyone who can reach this machine can read the run's report, files and image thumbnails, with no password (--host 127.0.0.1 keeps it to this machine)`;

/** Why `host:port` cannot be listened on, as the user can act on it. */
const listenFailure = (host: string, port: number, error: unknown): DashboardError => {
  const where = `cannot listen on ${host}:${port}`;
  const message = error instanceof Deno.errors.AddrInUse
    ? `${where}: the port is in use (another --port, or --port 0 for a free one)`
    : error instanceof Deno.errors.AddrNotAvailable
    ? `${where}: ${host} is not an address of this machine (--host 127.0.0.1, or one of its own addresses)`
    : error instanceof Deno.errors.PermissionDenied
    ? `${where}: permission denied (ports below 1024 need privileges: use --port 1024 or above)`
    : /lookup|resolve|Name or service/i.test(error instanceof Error ? error.message : String(error))
    ? `${where}: no such host name ${host} (--host takes an address of this machine, such as 127.0.0.1)`
    : `${where}: ${error instanceof Error ? error.message : String(error)}`;
  return new DashboardError({ message });
};

/** Starts the dashboard; a port or host that cannot be listened on is a DashboardError naming it. */
export const listenDashboard = (
  folder: string,
  options: DashboardOptions,
  run: <A>(effect: Effect.Effect<A, unknown, TensorBackend>) => Promise<A>,
): Effect.Effect<Dashboard, DashboardError> =>
  Effect.try({
    try: () => startDashboard(folder, options, run),
    catch: (error) => listenFailure(options.host ?? "127.0.0.1", options.port ?? 8080, error),
  });

const notFound = () => new Response("not found", { status: 404 });

/** The real path of `name` inside `folder`, or undefined when it is not a plain file inside it. */
export const fileInside = async (folder: string, name: string): Promise<string | undefined> => {
  const segments = name.split("/");
  if (
    name === "" || name.startsWith("/") || name.includes("\\") || name.includes("\0") ||
    segments.some((s) => s === "" || s === "." || s === "..")
  ) return undefined;
  try {
    const root = await Deno.realPath(folder);
    const real = await Deno.realPath(`${root}/${name}`);
    if (!real.startsWith(`${root}/`)) return undefined;
    return (await Deno.stat(real)).isFile ? real : undefined;
  } catch {
    return undefined;
  }
};

const size = async (path: string) => {
  try {
    return (await Deno.stat(path)).size;
  } catch {
    return 0;
  }
};

/** Bytes [from, to) of a file, or none when it is gone. */
const readRange = async (path: string, from: number, to: number) => {
  try {
    using file = await Deno.open(path);
    await file.seek(from, Deno.SeekMode.Start);
    const buffer = new Uint8Array(to - from);
    let read = 0;
    while (read < buffer.length) {
      const n = await file.read(buffer.subarray(read));
      if (n === null) break;
      read += n;
    }
    return buffer.subarray(0, read);
  } catch {
    return new Uint8Array(0);
  }
};

/** Bytes of metrics.jsonl read per poll: a huge file is followed from near its end, never read whole. */
const POLL_BYTES = 1 << 20;

/** Starts the dashboard of `folder`; `run` provides what the model views need (the tensor backend). */
export const startDashboard = (
  folder: string,
  options: DashboardOptions,
  run: <A>(effect: Effect.Effect<A, unknown, TensorBackend>) => Promise<A>,
): Dashboard => {
  const host = options.host ?? "127.0.0.1";
  const pollMs = options.pollMs ?? 500;
  const closers = new Set<() => void>();
  // The model views cost a feature extraction: computed once per checkpoint.
  let cached: { checkpoint: string; views: ModelViews | undefined } | undefined;
  const views = async () => {
    const latest = await Effect.runPromise(
      latestCheckpoint(folder).pipe(Effect.orElseSucceed(() => undefined)),
    );
    if (latest === undefined) return undefined;
    if (cached?.checkpoint !== latest) {
      const computed = await run(computeModelViews(folder)).catch(() => undefined);
      cached = { checkpoint: latest, views: computed };
    }
    return cached.views;
  };
  const html = (body: string) =>
    new Response(body, { headers: { "content-type": "text/html; charset=utf-8" } });

  const events = () => {
    const metrics = `${folder}/metrics.jsonl`;
    let offset = 0;
    let checkpoint: string | undefined;
    let timer: ReturnType<typeof setTimeout> | undefined;
    let close: () => void = () => {};
    const stream = new ReadableStream<Uint8Array>({
      start(controller) {
        const encoder = new TextEncoder();
        const send = (event: string, data: unknown) =>
          controller.enqueue(encoder.encode(`event: ${event}\ndata: ${JSON.stringify(data)}\n\n`));
        close = () => {
          clearTimeout(timer);
          closers.delete(close);
          try {
            controller.close();
          } catch {
            // already closed by the client
          }
        };
        closers.add(close);
        const poll = async () => {
          try {
            const end = await size(metrics);
            // Truncated or deleted: start again from the top.
            if (end < offset) {
              offset = 0;
              send("reset", {});
            }
            // A long file met for the first time: its last MiB (the page shows the rest already).
            let partial = false;
            if (offset === 0 && end > POLL_BYTES) {
              offset = end - POLL_BYTES;
              partial = true;
            }
            if (end > offset) {
              let bytes = await readRange(metrics, offset, Math.min(end, offset + POLL_BYTES));
              if (partial) {
                const start = bytes.indexOf(10) + 1;
                offset += start;
                bytes = bytes.subarray(start);
              }
              // Only whole lines; a half-written one waits for the next poll (a line longer than a
              // poll's bytes is no metrics line: skipped).
              const whole = bytes.lastIndexOf(10) + 1;
              offset += whole === 0 && bytes.length === POLL_BYTES ? bytes.length : whole;
              const text = new TextDecoder().decode(bytes.subarray(0, whole));
              const rows = text.split("\n").flatMap((line) => {
                try {
                  return line === "" ? [] : [JSON.parse(line)];
                } catch {
                  return [];
                }
              });
              if (rows.length > 0) send("metrics", rows);
            }
            const latest = await Effect.runPromise(
              latestCheckpoint(folder).pipe(Effect.orElseSucceed(() => undefined)),
            );
            if (latest !== checkpoint) {
              if (checkpoint !== undefined && latest !== undefined) send("checkpoint", { path: latest });
              checkpoint = latest;
            }
            timer = setTimeout(poll, pollMs);
          } catch {
            close();
          }
        };
        poll();
      },
      cancel() {
        close();
      },
    });
    return new Response(stream, {
      headers: { "content-type": "text/event-stream", "cache-control": "no-store", connection: "keep-alive" },
    });
  };

  const server = Deno.serve(
    { hostname: host, port: options.port ?? 8080, onListen: () => {} },
    async (request) => {
      try {
        if (request.method !== "GET") return notFound();
        const path = new URL(request.url).pathname;
        if (path === "/") {
          const records = await Effect.runPromise(readRunRecords(folder));
          return html(await Effect.runPromise(renderReport(records, await views(), { live: true })));
        }
        if (path === "/events") return events();
        if (path === "/fragment/curves") {
          return html(await Effect.runPromise(Effect.flatMap(readRunRecords(folder), renderCurves)));
        }
        if (path === "/fragment/events") {
          return html(
            renderEvents(await Effect.runPromise(readRunRecords(folder))),
          );
        }
        if (path.startsWith("/files/")) {
          let name: string;
          try {
            name = decodeURIComponent(path.slice("/files/".length));
          } catch {
            return notFound();
          }
          const real = await fileInside(folder, name);
          if (real === undefined) return notFound();
          // Streamed: a checkpoint of gigabytes is never held in memory.
          const file = await Deno.open(real, { read: true });
          return new Response(file.readable, {
            headers: { "content-type": "application/octet-stream", "x-content-type-options": "nosniff" },
          });
        }
        return notFound();
      } catch {
        // Whatever vanished under us: the page asks again.
        return notFound();
      }
    },
  );
  const address = server.addr as Deno.NetAddr;
  const shown = address.hostname.includes(":") ? `[${address.hostname}]` : address.hostname;
  return {
    url: `http://${shown}:${address.port}/`,
    host: address.hostname,
    port: address.port,
    shutdown: async () => {
      for (const close of [...closers]) close();
      await server.shutdown();
    },
  };
};

export const dashboardCommand = Command.make("dashboard", {
  runDir: Argument.String("RUN_DIR").pipe(Argument.withDescription("the run folder (train.out)")),
  port: Flag.String("port").pipe(
    Flag.withDescription("port (default 8080; 0 picks a free one)"),
    Flag.optional,
  ),
  host: Flag.String("host").pipe(
    Flag.withDescription("address to listen on (default 127.0.0.1: this machine only)"),
    Flag.optional,
  ),
}, (flags) =>
  reportFailure(
    Effect.gen(function* () {
      const context = yield* Effect.context<TensorBackend>();
      const port = Option.isSome(flags.port) ? yield* parsePort(flags.port.value) : 8080;
      const dashboard = yield* listenDashboard(flags.runDir, {
        port,
        ...(Option.isSome(flags.host) ? { host: flags.host.value } : {}),
      }, (effect) => Effect.runPromise(Effect.provideContext(effect, context)));
      const warning = exposureWarning(Option.getOrElse(flags.host, () => "127.0.0.1"), dashboard.port);
      if (warning !== undefined) console.error(warning);
      console.log(`dashboard of ${flags.runDir} at ${dashboard.url} (Ctrl-C stops it)`);
      return yield* Effect.never;
    }).pipe(Effect.provide(TensorBackend.layer())),
  )).pipe(
    Command.withDescription("Serve a run's report live while it trains"),
  );

if (import.meta.main) {
  dashboardCommand.pipe(
    Command.run({ version: "0.1.0" }),
    Effect.provide(NodeServices.layer),
    NodeRuntime.runMain,
  );
}

/**
 * Runs `effect` (a training run writing `folder`) with the dashboard beside it when `enabled`:
 * 127.0.0.1, a free port, the URL printed on stderr (stdout stays the command's result).
 */
export const withDashboard = <A, E, R>(
  enabled: boolean,
  folder: string,
  effect: Effect.Effect<A, E, R>,
): Effect.Effect<A, E, R | TensorBackend> =>
  enabled
    ? Effect.acquireUseRelease(
      Effect.gen(function* () {
        const context = yield* Effect.context<TensorBackend>();
        const dashboard = startDashboard(
          folder,
          { port: 0 },
          (inner) => Effect.runPromise(Effect.provideContext(inner, context)),
        );
        console.error(`dashboard: ${dashboard.url}`);
        return dashboard;
      }),
      () => effect,
      (dashboard) => Effect.promise(() => dashboard.shutdown()),
    )
    : effect;
