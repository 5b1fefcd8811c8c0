/**
 * The demo's own result reaches its report: `demo.json` (SwAV's kNN top-1 and
 * the same network's at random initialisation) is read with the run's records
 * and shown at the top of the page; a run that is not a demo shows none.
 */
import assert from "node:assert/strict";
import { Effect } from "effect";
import { renderReport } from "../pipelines/report_html.ts";
import { writeDemoRecord } from "../pipelines/run_records.ts";
import { readRunRecords } from "../pipelines/run_report.ts";

Deno.test("the demo's kNN result (SwAV vs random init) is in its run folder and at the top of its report", async () => {
  const folder = await Deno.makeTempDir({ prefix: "swav-demo-report-" });
  try {
    const record = {
      swav_knn_top1: 0.4 + 0.5 * Math.random(),
      random_init_knn_top1: 0.1 + 0.2 * Math.random(),
      knn_k: 20,
      knn_temperature: 0.07,
      classes: 10,
      epochs: 10,
      seconds: 321.5,
    };
    const path = await Effect.runPromise(writeDemoRecord(folder, record));
    assert.equal(path, `${folder}/demo.json`);
    const records = await Effect.runPromise(readRunRecords(folder));
    assert.deepEqual(records.demo, record);
    const html = await Effect.runPromise(renderReport(records, undefined));
    const section = html.match(/<section id="demo">[\s\S]*?<\/section>/)?.[0];
    assert.ok(section !== undefined, "no demo section");
    const pct = (x: number) => `${(100 * x).toFixed(1)}%`;
    assert.match(
      section,
      new RegExp(
        `SwAV ${pct(record.swav_knn_top1).replace(".", "\\.")}</b> vs random init ${
          pct(record.random_init_knn_top1).replace(".", "\\.")
        } \\(chance 10\\.0%\\)`,
      ),
    );
    assert.match(section, /k = 20, T = 0\.07 on backbone features; 10 epochs in 321\.5 s/);
    // It comes before the training curves: the first thing a demo user reads.
    assert.ok(html.indexOf('id="demo"') < html.indexOf("Training curves"));

    await Deno.remove(`${folder}/demo.json`);
    const plain = await Effect.runPromise(
      renderReport(await Effect.runPromise(readRunRecords(folder)), undefined),
    );
    assert.doesNotMatch(plain, /id="demo"/);
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
});
