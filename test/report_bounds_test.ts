/**
 * The report against large and hostile run folders: an ImageNet-sized evaluation is summarised in a
 * bounded size, and no value from a run folder reaches the page unescaped.
 */
import assert from "node:assert/strict";
import { Effect } from "effect";
import { EVENTS_SHOWN, renderReport } from "../pipelines/report_html.ts";
import { HEATMAP_MAX_CLASSES, LISTED, topConfusions } from "../pipelines/report_eval.ts";
import { CONFIG_CAP, KEEP_ROWS, thinningRows } from "../pipelines/report_records.ts";
import { readRunRecords, seededRandom, THUMB_SIDE, thumbnail } from "../pipelines/run_report.ts";
import { findBrowser, inspectPage } from "./_browser.ts";
import { needs } from "./_optional.ts";
import { syntheticEval } from "./_synthetic_eval.ts";

const reportOf = (folder: string, live = false) =>
  Effect.runPromise(
    Effect.flatMap(readRunRecords(folder), (records) => renderReport(records, undefined, { live })),
  );

/** Every off-diagonal cell, largest first, ties by (truth, predicted): the slow, obvious way. */
const bruteForce = (confusion: number[][]) =>
  confusion.flatMap((row, truth) =>
    row.flatMap((count, predicted) =>
      predicted === truth || count === 0
        ? []
        : [{ truth, predicted, count, share: count / row.reduce((s, x) => s + x) }]
    )
  ).sort((a, b) => b.count - a.count || a.truth - b.truth || a.predicted - b.predicted);

Deno.test("topConfusions: the largest off-diagonal cells, as a full sort finds them", () => {
  const random = seededRandom(7);
  for (const [n, k] of [[1, 5], [2, 3], [7, 20], [40, 20], [90, 5]] as const) {
    const confusion = Array.from(
      { length: n },
      () => Array.from({ length: n }, () => Math.floor(random() * 6)),
    );
    assert.deepEqual(topConfusions(confusion, k), bruteForce(confusion).slice(0, k), `n ${n} k ${k}`);
  }
});

Deno.test("an evaluation of 1500 classes: summarised (sorted accuracy, lowest classes, top confusions) under 1 MB", async () => {
  const folder = await Deno.makeTempDir({ prefix: "swav-report-classes-" });
  try {
    const result = syntheticEval(1500);
    await Deno.writeTextFile(`${folder}/eval-knn.json`, JSON.stringify(result));
    const html = await reportOf(folder);
    assert.ok(html.length < 1_000_000, `report of ${html.length} characters`);
    assert.match(html, /1500 classes: more than 50, so the confusion matrix is summarised/);
    assert.doesNotMatch(html, /confusion matrix <a/);
    // The first row of the confused-pairs table is the largest off-diagonal cell.
    const top = bruteForce(result.confusion as number[][])[0]!;
    const classes = result.classes as string[];
    assert.match(
      html,
      new RegExp(
        `most confused pairs</h4>.*?<tbody><tr><td>${classes[top.truth]}</td><td>${
          classes[top.predicted]
        }</td><td>${top.count}</td>`,
        "s",
      ),
    );
    assert.equal(html.match(/<tr><td>n0/g)?.length, 2 * LISTED);
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
});

Deno.test(`up to ${HEATMAP_MAX_CLASSES} classes the whole confusion matrix is drawn`, async () => {
  const folder = await Deno.makeTempDir({ prefix: "swav-report-classes-" });
  try {
    await Deno.writeTextFile(`${folder}/eval-knn.json`, JSON.stringify(syntheticEval(HEATMAP_MAX_CLASSES)));
    const html = await reportOf(folder);
    assert.match(html, /confusion matrix <a/);
    assert.doesNotMatch(html, /summarised/);
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
});

// A payload that runs if pasted raw: as text, in an attribute, and as a tag that is not <script>.
const payload = `<script>window.__pwned=1</script><img src=x onerror="window.__pwned=2">'"&`;

/** A run folder with the payload in every field the report reads, and a few wrong types. */
const hostileFolder = async () => {
  // The folder's name is in the page's title too.
  const folder = `${await Deno.makeTempDir({ prefix: "swav-report-" })}/<script>x`;
  await Deno.mkdir(folder);
  const metric = (step: number) => ({
    step,
    epoch: payload,
    loss: payload,
    lr: payload,
    images_per_s: 1,
    code_entropy: payload,
    prototypes_in_use: 2,
    [payload]: payload,
  });
  await Deno.writeTextFile(
    `${folder}/metrics.jsonl`,
    [1, 2, 3].map((s) => JSON.stringify(metric(s))).join("\n") + "\n",
  );
  await Deno.writeTextFile(
    `${folder}/epochs.jsonl`,
    JSON.stringify({ epoch: 1, mean_loss: payload, knn_top1: payload, online_probe_top1: 0.5 }) + "\n",
  );
  const events = Array.from(
    { length: EVENTS_SHOWN + 5 },
    (_, i) => ({ step: i, kind: payload, text: payload }),
  );
  events.push({ step: 999, kind: "collapse", text: { [payload]: payload } as never });
  await Deno.writeTextFile(`${folder}/events.jsonl`, events.map((e) => JSON.stringify(e)).join("\n") + "\n");
  await Deno.writeTextFile(
    `${folder}/config.json`,
    JSON.stringify({ [payload]: payload, model: { prototypes: payload }, data: { source: payload } }),
  );
  await Deno.writeTextFile(
    `${folder}/eval-knn.json`,
    JSON.stringify({
      method: payload,
      top1: payload,
      checkpoint: payload,
      classes: [payload, payload, { [payload]: 1 }],
      confusion: [[1, 2, 0], [0, 3, 1], [1, 1, 1]],
      per_class_accuracy: [payload, 1, null],
    }),
  );
  await Deno.writeTextFile(
    `${folder}/eval-linear.json`,
    JSON.stringify({
      method: "linear",
      classes: payload,
      confusion: [[payload]],
      per_class_accuracy: payload,
    }),
  );
  return folder;
};

Deno.test("every value from a hostile run folder is escaped: no tag or attribute of the data reaches the page", async () => {
  const folder = await hostileFolder();
  try {
    const html = await reportOf(folder);
    assert.doesNotMatch(html, /<script|<img|onerror="/i);
    assert.match(html, /&lt;script&gt;window.__pwned=1&lt;\/script&gt;/);
    assert.match(html, /epoch &lt;script&gt;/);
    assert.match(html, /the last 200 of 206 warnings/);
    // The dashboard's page: its own script, and that one only.
    const live = await reportOf(folder, true);
    assert.equal(live.match(/<script/gi)?.length, 1);
    assert.doesNotMatch(live, /<img|onerror="/i);
  } finally {
    await Deno.remove(`${folder}/..`, { recursive: true });
  }
});

const browser = needs("chromium");
Deno.test({
  name: `a hostile run folder's report runs nothing in a headless browser (${browser.what})`,
  ignore: browser.ignore,
  fn: browser.guard(async () => {
    const folder = await hostileFolder();
    try {
      const file = `${folder}/report.html`;
      await Deno.writeTextFile(file, await reportOf(folder));
      const page = await inspectPage(
        findBrowser()!,
        `file://${file}`,
        `({ pwned: window.__pwned ?? 0, scripts: document.scripts.length, images: document.images.length })`,
      );
      assert.deepEqual(page.value, { pwned: 0, scripts: 0, images: 0 });
    } finally {
      await Deno.remove(`${folder}/..`, { recursive: true });
    }
  }),
});

Deno.test("thinningRows keeps evenly spaced rows, the last one, and lets a rewound key replace what it repeats", () => {
  const kept = thinningRows<number>(100, (x) => x);
  for (let i = 0; i < 100_000; i++) kept.add(i);
  const rows = kept.rows();
  assert.ok(rows.length >= 100 && rows.length <= 201, `${rows.length} rows`);
  assert.equal(rows[0], 0);
  assert.equal(rows.at(-1), 99_999);
  const gaps = new Set(rows.slice(1, -1).map((x, i) => x - rows[i]!));
  assert.equal(gaps.size, 1, `gaps ${[...gaps]}`);
  // A resumed run repeats steps 50..59 after 0..99: the second 50..59 win, 60..99 are gone.
  const resumed = thinningRows<{ step: number; run: number }>(1000, (r) => r.step);
  for (let s = 0; s < 100; s++) resumed.add({ step: s, run: 1 });
  for (let s = 50; s < 60; s++) resumed.add({ step: s, run: 2 });
  const after = resumed.rows();
  assert.deepEqual(after.map((r) => r.step), Array.from({ length: 60 }, (_, s) => s));
  assert.ok(after.slice(50).every((r) => r.run === 2));
});

Deno.test("a 30 MB metrics.jsonl is read streamed and thinned; a FIFO or an oversized config is not read", async () => {
  const folder = await Deno.makeTempDir({ prefix: "swav-report-large-" });
  try {
    const lines = 250_000;
    const file = await Deno.open(`${folder}/metrics.jsonl`, { write: true, create: true });
    const encoder = new TextEncoder();
    for (let from = 0; from < lines; from += 10_000) {
      const block = Array.from({ length: 10_000 }, (_, i) =>
        JSON.stringify({
          epoch: Math.floor((from + i) / 1000),
          step: from + i + 1,
          loss: 8 - (from + i) / lines,
          lr: 0.6,
          images_per_s: 100,
          code_entropy: 3.2,
          prototypes_in_use: 30,
        }) + "\n");
      await file.write(encoder.encode(block.join("")));
    }
    file.close();
    assert.ok((await Deno.stat(`${folder}/metrics.jsonl`)).size > 25e6);
    const mkfifo = await new Deno.Command("mkfifo", { args: [`${folder}/events.jsonl`] }).output();
    assert.ok(mkfifo.success);
    await Deno.writeTextFile(`${folder}/config.json`, JSON.stringify({ pad: "x".repeat(CONFIG_CAP) }));
    const records = await Effect.runPromise(readRunRecords(folder));
    assert.ok(records.metrics.length <= 2 * KEEP_ROWS + 1, `${records.metrics.length} rows kept`);
    assert.equal(records.metrics.at(-1)?.step, lines);
    assert.equal(records.metrics[0]?.step, 1);
    assert.equal(records.events.length, 0);
    assert.equal(records.config, undefined);
    const html = await Effect.runPromise(renderReport(records, undefined));
    assert.match(html, /step 250000, epoch 249/);
    assert.match(html, /config\.json: 1 MiB is over the 1 MiB this reader accepts: not read/);
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
});

Deno.test("thumbnails: an ImageNet-sized image is inlined at most 64 px a side, each pixel its box's mean", () => {
  const random = seededRandom(3);
  const image = (width: number, height: number) => ({
    width,
    height,
    data: Uint8Array.from({ length: width * height * 3 }, () => Math.floor(random() * 256)),
  });
  const big = image(640, 480);
  const small = thumbnail(big);
  assert.deepEqual([small.width, small.height], [64, 48]);
  // Reference: the mean of each 10 x 10 box, summed in float64.
  for (const [x, y, c] of [[0, 0, 0], [63, 47, 2], [17, 30, 1]] as const) {
    let sum = 0;
    for (let v = 0; v < 10; v++) {
      for (let u = 0; u < 10; u++) sum += big.data[((y * 10 + v) * 640 + x * 10 + u) * 3 + c]!;
    }
    assert.equal(small.data[(y * 64 + x) * 3 + c], Math.round(sum / 100));
  }
  const odd = thumbnail(image(500, 375));
  assert.deepEqual([odd.width, odd.height], [THUMB_SIDE, 48]);
  const tiny = image(32, 32);
  assert.equal(thumbnail(tiny), tiny);
});
