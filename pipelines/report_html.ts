/**
 * The run report as one self-contained HTML page: styles inline, plots as inline `<svg>`
 * (pipelines/report_plots.ts), images as `data:` PNGs, nothing fetched from the network.
 * The dashboard serves the same page with a small inline script that follows the run live.
 */
import { Effect } from "effect";
import type { DecodeError } from "../data/image_codec.ts";
import type { LoaderError } from "../data/loader.ts";
import type { SourceError } from "../data/sources.ts";
import type { LoadForEvaluationError } from "./evaluate.ts";
import type { EpochRecord } from "./run_records.ts";
import {
  computeModelViews,
  type ModelViews,
  readRunRecords,
  type RunRecords,
  type Thumb,
  type ViewOptions,
} from "./run_report.ts";
import { renderEval } from "./report_eval.ts";
import { escapeHtml, figure, fixed, text, thin } from "./report_markup.ts";
import { barSpec, lineSpec, renderSvg, scatterSpec } from "./report_plots.ts";

export { escapeHtml };

const prototypesOf = (records: RunRecords): number | undefined => {
  const model = records.config?.model as { prototypes?: unknown } | undefined;
  return typeof model?.prototypes === "number" ? model.prototypes : undefined;
};

/** The curves over steps and epochs (the part the dashboard re-renders as the run grows). */
export const renderCurves = (records: RunRecords): Effect.Effect<string> =>
  Effect.gen(function* () {
    if (
      records.metrics.length === 0
    ) return `<p class="empty">no steps recorded yet (metrics.jsonl is empty)</p>`;
    const rows = thin(records.metrics, 1500).map((m) => ({ ...m }));
    const step = { field: "step", title: "step" };
    const k = prototypesOf(records);
    const parts: string[] = [];
    const line = (title: string, field: string, rules: { value: number; label: string }[] = []) =>
      Effect.map(renderSvg(lineSpec(rows, step, { field, title }, rules)), (svg) => figure(title, svg));
    parts.push(
      yield* line(
        "loss",
        "loss",
        k === undefined ? [] : [{ value: Math.log(k), label: `ln K = ${Math.log(k).toFixed(3)}` }],
      ),
    );
    parts.push(yield* line("learning rate", "lr"));
    parts.push(yield* line("images/s", "images_per_s"));
    // What the run's method has: SwAV code entropy and prototypes in use, DeepCluster-v2 prototypes in
    // use, SimCLR the embeddings' spread (its collapse signal).
    const has = (field: string) =>
      records.metrics.some((m) => (m as unknown as Record<string, unknown>)[field] !== undefined);
    if (has("code_entropy")) parts.push(yield* line("code entropy", "code_entropy"));
    if (has("prototypes_in_use")) parts.push(yield* line("prototypes in use", "prototypes_in_use"));
    if (has("embedding_std")) parts.push(yield* line("embedding spread (std)", "embedding_std"));
    const epochs = thin(records.epochs.filter((e) => e.mean_loss !== null), 1500);
    if (epochs.length > 0) {
      const svg = yield* renderSvg(
        lineSpec(epochs as EpochRecord[] as never, { field: "epoch", title: "epoch" }, {
          field: "mean_loss",
          title: "mean loss",
        }),
      );
      parts.push(figure("mean loss per epoch", svg));
    }
    const accuracy = thin(records.epochs, 1500).flatMap((e) => [
      ...(e.knn_top1 === undefined ? [] : [{ epoch: e.epoch, top1: e.knn_top1, series: "kNN top-1" }]),
      ...(e.online_probe_top1 === undefined
        ? []
        : [{ epoch: e.epoch, top1: e.online_probe_top1, series: "online probe top-1" }]),
    ]);
    if (accuracy.length > 0) {
      const svg = yield* renderSvg(
        lineSpec(
          accuracy,
          { field: "epoch", title: "epoch" },
          { field: "top1", title: "top-1", zero: true },
          [],
          "series",
        ),
      );
      parts.push(figure("kNN / online-probe top-1 per epoch", svg));
    } else {
      parts.push(
        `<p class="empty">no kNN or online-probe accuracy recorded (train.knnEvery, labelled data)</p>`,
      );
    }
    return `<div class="grid">${parts.join("\n")}</div>`;
  });

const img = (thumb: Thumb, role: string) =>
  `<img class="${role}" alt="${escapeHtml(thumb.label)}" title="${
    escapeHtml(thumb.label)
  }" src="data:image/png;base64,${thumb.pngBase64}">`;

const renderRetrieval = (views: ModelViews) => {
  const rows = views.queries.map((query, q) =>
    `<tr><td>${img(query, "query")}</td><td class="nn">${
      views.trained[q]!.map((t) => img(t, "neighbour trained")).join("")
    }</td><td class="nn">${views.random[q]!.map((t) => img(t, "neighbour random")).join("")}</td></tr>`
  );
  const where = views.fromTrain
    ? `The source has no test split: the queries are a fixed sample of training images (${
      escapeHtml(views.testSource)
    }), never their own neighbours.`
    : `Queries: ${views.queries.length} fixed test images of ${escapeHtml(views.testSource)}.`;
  return `<p>${where} Neighbours: the ${
    views.trained[0]?.length ?? 0
  } most similar (cosine of backbone features) of ${views.trainPool} training images.</p>
<table class="retrieval"><thead><tr><th>query</th><th>nearest, last checkpoint</th><th>nearest, random init</th></tr></thead>
<tbody>${rows.join("\n")}</tbody></table>`;
};

/** Bars of the prototype usage plot, and classes up to which the feature map has a legend. */
const USAGE_BARS = 500;
const LEGEND_MAX_CLASSES = 20;

const renderModelViews = (views: ModelViews) =>
  Effect.gen(function* () {
    const usage = views.prototypeUsage
      .map((count, k) => ({ prototype: k, count }))
      .sort((a, b) => b.count - a.count || a.prototype - b.prototype)
      .map((r, rank) => ({ rank: rank + 1, count: r.count, prototype: r.prototype }));
    const used = usage.filter((u) => u.count > 0).length;
    // Thousands of prototypes: the sorted shape with at most USAGE_BARS bars (first and last kept).
    const usageSvg = yield* renderSvg(
      barSpec(
        thin(usage, USAGE_BARS),
        { field: "rank", title: "prototypes, most used first", labels: false },
        {
          field: "count",
          title: "test images",
        },
      ),
    );
    const labelled = views.classes !== undefined && views.map.some((p) => p.label >= 0);
    const points = views.map.map((p) => ({
      x: Math.round(p.x * 1e4) / 1e4,
      y: Math.round(p.y * 1e4) / 1e4,
      ...(labelled ? { class: views.classes![p.label] ?? String(p.label) } : {}),
    }));
    const mapSvg = points.length === 0 ? "" : yield* renderSvg(
      scatterSpec(points, labelled ? "class" : undefined, (views.classes?.length ?? 0) <= LEGEND_MAX_CLASSES),
    );
    return `<section id="checkpoint"><h2>At the last checkpoint</h2>
<p class="meta">${escapeHtml(views.checkpoint)}${views.step === undefined ? "" : `, step ${views.step}`}</p>
${
      // Only SwAV's single head is shown (DeepCluster-v2's heads and SimCLR give no usage here).
      views.prototypes === 0 ? "" : figure(
        "prototype usage",
        usageSvg,
        `${used} of ${views.prototypes} prototypes take at least one of ${views.testCount} ${
          views.fromTrain ? "training" : "test"
        } images${usage.length > USAGE_BARS ? ` (${USAGE_BARS} of the ranks drawn)` : ""}`,
      )}
<h3>Retrieval</h3>
${renderRetrieval(views)}
<h3>Feature map</h3>
${
      mapSvg === "" ? `<p class="empty">too few images for a map</p>` : figure(
        "UMAP of backbone features",
        mapSvg,
        `${points.length} ${views.fromTrain ? "training" : "test"} images, seeded${
          labelled
            ? `, coloured by class${
              views.classes!.length > LEGEND_MAX_CLASSES
                ? ` (no legend above ${LEGEND_MAX_CLASSES} classes)`
                : ""
            }`
            : ""
        }`,
      )
    }
</section>`;
  });

const style = `body{font:14px/1.4 sans-serif;margin:1.5em auto;max-width:1000px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
.grid{display:flex;flex-wrap:wrap;gap:1em}figure.plot{margin:0}figcaption{font-weight:bold;margin-bottom:.3em}
.note,.meta{color:#666;font-weight:normal}.cfg{font-weight:normal;font-size:.85em}
.warning{background:#fdecea;border:1px solid #e74c3c;padding:.6em 1em;border-radius:4px}
table.retrieval{border-collapse:collapse}table.retrieval td{padding:3px 8px 3px 0;vertical-align:middle}
table.retrieval img{width:40px;height:40px;image-rendering:pixelated;margin-right:2px;border:1px solid #ccc}
table.retrieval img.query{border:2px solid #333}td.nn{white-space:nowrap}
pre{background:#f6f6f6;padding:.8em;overflow:auto;font-size:12px}.empty{color:#888}
table.summary{border-collapse:collapse;font-size:12px}table.summary td,table.summary th{padding:1px 8px 1px 0;text-align:left}
h4{margin:.2em 0}`;

/** The live part of the dashboard: on each server-sent event, re-fetch the curves and events. */
const liveCode = `
const source = new EventSource("events");
const refresh = async (id, path) => {
  const response = await fetch(path, { cache: "no-store" });
  if (response.ok) document.getElementById(id).innerHTML = await response.text();
};
source.addEventListener("metrics", () => { refresh("curves", "fragment/curves"); refresh("events", "fragment/events"); });
source.addEventListener("checkpoint", () => location.reload());
`;
const liveScript = `<script>${liveCode}</script>`;

/**
 * What the page may load and run, a second wall behind the escaping: the report runs no script
 * at all; the dashboard's page runs only its own script (by hash) and talks only to its server.
 */
const liveHash = btoa(
  String.fromCharCode(
    ...new Uint8Array(await crypto.subtle.digest("SHA-256", new TextEncoder().encode(liveCode))),
  ),
);
const policy = (live: boolean) =>
  `default-src 'none'; img-src data:; style-src 'unsafe-inline'${
    live ? `; script-src 'sha256-${liveHash}'; connect-src 'self'` : ""
  }`;

/** Warnings shown: the last ones (a run that warns at every step keeps a page of bounded size). */
export const EVENTS_SHOWN = 200;

export const renderEvents = (records: RunRecords): string => {
  const notes = (records.notes ?? []).map((note) => `<p class="warning">${text(note, 1000)}</p>\n`).join("");
  if (records.events.length === 0) return notes === "" ? `<p class="empty">no warnings</p>` : notes;
  const count = Math.max(records.eventCount ?? 0, records.events.length);
  return notes +
    (count > EVENTS_SHOWN ? `<p class="note">the last ${EVENTS_SHOWN} of ${count} warnings</p>\n` : "") +
    records.events.slice(-EVENTS_SHOWN).map((e) =>
      `<p class="${e.kind === "collapse" ? "warning collapse" : "warning"}">step ${e.step}: ${
        text(e.text, 500)
      }</p>`
    ).join("\n");
};

/** What marks a file as a report this program wrote (`report --out` overwrites only such a file). */
export const REPORT_MARK = `<meta name="generator" content="swav-ts report">`;

/** How a report page is rendered: its timestamp, and whether it is the dashboard's live page. */
export interface RenderOptions {
  /** Shown at the top; the only part that changes between two reports of the same run folder. */
  readonly generatedAt?: string;
  /** The dashboard's page: adds the script that follows the run. */
  readonly live?: boolean;
}

/**
 * The demo's own result (demo.json): kNN top-1 of the trained backbone beside
 * the same network at its random initialisation, on the demo's test split.
 */
export const renderDemo = (demo: Record<string, unknown> | undefined): string => {
  if (demo === undefined) return "";
  const pct = (x: unknown) => typeof x === "number" && Number.isFinite(x) ? `${(100 * x).toFixed(1)}%` : "?";
  const classes = typeof demo.classes === "number" ? demo.classes : undefined;
  return `<section id="demo"><h2>Demo result</h2>
<p class="demo">kNN top-1 on the test split: <b>SwAV ${pct(demo.swav_knn_top1)}</b> vs random init ${
    pct(demo.random_init_knn_top1)
  }${classes === undefined ? "" : ` (chance ${pct(1 / classes)})`}</p>
<p class="meta">k = ${escapeHtml(String(demo.knn_k ?? "?"))}, T = ${
    escapeHtml(String(demo.knn_temperature ?? "?"))
  } on backbone features; ${escapeHtml(String(demo.epochs ?? "?"))} epochs in ${
    escapeHtml(String(demo.seconds ?? "?"))
  } s</p></section>`;
};

/** The whole page. */
export const renderReport = (
  records: RunRecords,
  views: ModelViews | undefined,
  options: RenderOptions = {},
): Effect.Effect<string> =>
  Effect.gen(function* () {
    const last = records.metrics.at(-1);
    const evals = yield* Effect.forEach(records.evals, renderEval);
    const title = `SwAV run ${records.folder}`;
    return `<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">${REPORT_MARK}
<meta http-equiv="Content-Security-Policy" content="${policy(options.live === true)}"><title>${
      escapeHtml(title)
    }</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>${style}</style></head>
<body>
<h1>${escapeHtml(title)}</h1>
<p class="meta">${
      last === undefined
        ? "no steps yet"
        : `step ${last.step}, epoch ${text(last.epoch, 40)}, last loss ${fixed(last.loss, 4)}`
    }${
      options.generatedAt === undefined ? "" : ` · generated <time>${escapeHtml(options.generatedAt)}</time>`
    }</p>
<details id="config"><summary>config</summary><pre>${
      escapeHtml(records.config === undefined ? "(no config.json)" : JSON.stringify(records.config, null, 2))
    }</pre></details>
${renderDemo(records.demo)}
<section><h2>Warnings</h2><div id="events">${renderEvents(records)}</div></section>
<section><h2>Training curves</h2><div id="curves">${yield* renderCurves(records)}</div></section>
${
      views === undefined
        ? `<section id="checkpoint"><h2>At the last checkpoint</h2><p class="empty">no checkpoint yet</p></section>`
        : yield* renderModelViews(views)
    }
${evals.length === 0 ? "" : `<section id="evaluation"><h2>Evaluation</h2>${evals.join("\n")}</section>`}
${options.live ? liveScript : ""}
</body></html>
`;
  });

/**
 * How `buildReport` fails: the run's newest checkpoint does not load for its model views
 * (LoadForEvaluationError), or the run's train SOURCE does not open or read (SourceError, LoaderError, DecodeError).
 */
export type BuildReportError = LoadForEvaluationError | SourceError | LoaderError | DecodeError;

/**
 * The report of a run folder: its records, and the model views of its latest checkpoint when it has one.
 *
 * @example The HTML report of a (tiny, one-epoch) run folder
 * ```ts
 * import { Effect } from "effect";
 * import assert from "node:assert/strict";
 * import { buildReport, decodeRunConfig, pretrain, TensorBackend, writeDemoDataset } from "@swav/swav-ts";
 *
 * const data = await Deno.makeTempDir();
 * const out = await Deno.makeTempDir();
 * await writeDemoDataset({ folder: data, perClassTrain: 4, perClassTest: 2, size: 16, seed: 1 });
 * const html = await Effect.runPromise(Effect.gen(function* () {
 *   const config = yield* decodeRunConfig({
 *     data: { source: `${data}:train` },
 *     multicrop: { nmbCrops: [2, 2], sizeCrops: [16, 8], minScaleCrops: [0.3, 0.1], maxScaleCrops: [1, 0.3] },
 *     model: { arch: "resnet18", width: 4, stem: "cifar", hidden: 32, out: 16, prototypes: 20 },
 *     train: { epochs: 1, batchSize: 8, out, knnEvery: 0 },
 *   });
 *   yield* pretrain(config);
 *   return yield* buildReport(out, { queries: 2, neighbours: 2, maxTrain: 40, maxTest: 20 });
 * }).pipe(Effect.provide(TensorBackend.layer("wasm"))));
 * assert.match(html, /^<!DOCTYPE html>/);
 * assert.match(html, /Training curves/);
 * await Deno.writeTextFile(`${out}/report.html`, html); // one self-contained file
 * await Deno.remove(data, { recursive: true });
 * await Deno.remove(out, { recursive: true });
 * ```
 */
export const buildReport = (
  folder: string,
  options: RenderOptions & ViewOptions = {},
): Effect.Effect<string, BuildReportError> =>
  Effect.gen(function* () {
    const records = yield* readRunRecords(folder);
    const views = yield* computeModelViews(folder, options);
    return yield* renderReport(records, views, options);
  });
