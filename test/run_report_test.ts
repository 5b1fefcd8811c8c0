import assert from "node:assert/strict";
import { Effect } from "effect";
import { TensorBackend } from "../backend/tensor_backend.ts";
import { evaluate, evaluationJson } from "../pipelines/evaluate.ts";
import { buildReport } from "../pipelines/report_html.ts";
import { runFolderOfCheckpoint, runRecords, writeEvalRecord } from "../pipelines/run_records.ts";
import { parseJsonLines, readRunRecords } from "../pipelines/run_report.ts";
import { findBrowser, inspectPage } from "./_browser.ts";
import { tinyRun, writeTinyData } from "./_tiny_run.ts";
import { optionalTest } from "./_optional.ts";

const wasm = TensorBackend.layer("wasm");
const data = await writeTinyData();
const run = await Deno.makeTempDir({ prefix: "swav-report-run-" });
await tinyRun(data, run);
// A finished kNN evaluation of the last checkpoint, kept in the run folder as `eval --json` does.
const evalPath = await Effect.runPromise(
  Effect.flatMap(
    evaluate({ checkpoint: run, method: "knn", k: 10 }),
    (result) => writeEvalRecord(evaluationJson(result)),
  ).pipe(Effect.provide(wasm)),
);
// A warning in events.jsonl, as the collapse check writes it.
await Effect.runPromise(runRecords(run).event(9, "collapse", "training looks collapsed at step 9: test"));
const report = (generatedAt?: string) =>
  Effect.runPromise(
    buildReport(run, generatedAt === undefined ? {} : { generatedAt }).pipe(Effect.provide(wasm)),
  );
const html = await report("2000-01-01T00:00:00.000Z");

Deno.test("the run folder keeps epochs.jsonl with the kNN check and eval-knn.json with the confusion matrix", async () => {
  const epochs = parseJsonLines(await Deno.readTextFile(`${run}/epochs.jsonl`));
  assert.deepEqual(epochs.map((e) => e.epoch), [1, 2]);
  for (const e of epochs) {
    assert.equal(typeof e.mean_loss, "number");
    assert.ok(typeof e.knn_top1 === "number" && e.knn_top1 >= 0 && e.knn_top1 <= 1, JSON.stringify(e));
  }
  assert.equal(evalPath, `${run}/eval-knn.json`);
  const result = JSON.parse(await Deno.readTextFile(evalPath!));
  assert.equal(result.method, "knn");
  assert.equal(result.confusion.length, 10);
  assert.equal(result.confusion.flat().reduce((a: number, b: number) => a + b, 0), result.test_samples);
  const records = await Effect.runPromise(readRunRecords(run));
  assert.equal(records.events.at(-1)?.kind, "collapse");
  assert.equal(records.metrics.length, 14);
});

Deno.test("an eval of an exported encoder writes no eval file; a checkpoint's run folder is its folder", () => {
  assert.equal(runFolderOfCheckpoint("runs/a/checkpoint-000000007.swav"), "runs/a");
  assert.equal(runFolderOfCheckpoint("runs/export"), undefined);
});

Deno.test("records read a half-written or missing file as empty, never fail", async () => {
  assert.deepEqual(parseJsonLines('{"step":1}\n{"step":2}\n{"st'), [{ step: 1 }, { step: 2 }]);
  const missing = await Effect.runPromise(readRunRecords(`${run}/no-such-folder`));
  assert.equal(missing.metrics.length, 0);
  assert.equal(missing.config, undefined);
});

Deno.test("the report is self-contained: inline svg plots, data: images, nothing from the network", () => {
  assert.doesNotMatch(html, /(src|href)\s*=\s*["']?\s*(https?:)?\/\//i);
  assert.doesNotMatch(html, /<canvas|<script|<link|@import|url\(/i);
  // loss, lr, images/s, entropy, prototypes in use, epoch loss, kNN per epoch, usage, map, confusion, per class
  assert.equal(html.match(/<svg /g)?.length, 11);
  assert.match(html, /ln K = 3\.401/);
  assert.match(html, /<details id="config">/);
  assert.match(html, /class="warning collapse">step 9: training looks collapsed/);
  assert.equal(html.match(/<img /g)?.length, 8 + 2 * 8 * 8);
  assert.equal(html.match(/src="data:image\/png;base64,/g)?.length, 8 + 2 * 8 * 8);
  assert.match(html, /Queries: 8 fixed test images/);
});

Deno.test("the report is identical byte for byte for the same run folder twice (timestamp aside)", async () => {
  const again = await report("2001-02-03T04:05:06.000Z");
  const strip = (text: string) => text.replace(/<time>[^<]*<\/time>/, "<time></time>");
  assert.notEqual(again, html);
  assert.equal(strip(again), strip(html));
});

optionalTest(
  "the report opens in a headless browser: no errors, every plot drawn, the retrieval grid complete",
  [
    "chromium",
  ],
  async () => {
    const browser = findBrowser();
    assert.ok(browser !== undefined, "no browser");
    const file = `${run}/report.html`;
    await Deno.writeTextFile(file, html);
    const page = await inspectPage(
      browser,
      `file://${file}`,
      `(() => {
      const svgs = [...document.querySelectorAll("svg")];
      const marks = svgs.map((svg) => [...svg.querySelectorAll("g.role-mark")]
        .reduce((n, g) => n + g.querySelectorAll("path, rect, line, text, circle").length, 0));
      const images = [...document.querySelectorAll("table.retrieval img")];
      return {
        svgs: svgs.length,
        marks,
        drawn: svgs.map((svg) => svg.getBoundingClientRect().width),
        images: images.length,
        decoded: images.filter((img) => img.complete && img.naturalWidth > 0).length,
        queries: document.querySelectorAll("table.retrieval img.query").length,
      };
    })()`,
    );
    const value = page.value as {
      svgs: number;
      marks: number[];
      drawn: number[];
      images: number;
      decoded: number;
      queries: number;
    };
    assert.deepEqual(page.errors, []);
    assert.equal(value.svgs, 11);
    assert.ok(value.marks.every((n) => n > 0), `marks per plot: ${value.marks}`);
    assert.ok(value.drawn.every((w) => w > 100), `plot widths: ${value.drawn}`);
    assert.equal(value.images, 8 + 2 * 8 * 8);
    assert.equal(value.decoded, value.images);
    assert.equal(value.queries, 8);
    assert.equal([...page.screenshot.slice(1, 4)].map((c) => String.fromCharCode(c)).join(""), "PNG");
    const shot = `${run}/report.png`;
    await Deno.writeFile(shot, page.screenshot);
    console.log(`screenshot: ${shot} (${page.screenshot.length} bytes)`);
  },
);

globalThis.addEventListener("unload", () => {
  Deno.removeSync(run, { recursive: true });
  Deno.removeSync(data, { recursive: true });
});
