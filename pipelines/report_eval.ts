/**
 * The evaluation part of the report: one section per `eval-<method>.json` of the run folder.
 *
 * Up to `HEATMAP_MAX_CLASSES` classes it draws the confusion matrix and a bar per class. Above it
 * (ImageNet has 1000) a matrix of a million cells is neither readable nor cheap (hundreds of MB
 * of SVG), so the section summarises it in a size that does not grow with the class count: the
 * per-class accuracy sorted (at most `CURVE_POINTS` points), the `LISTED` lowest classes and the
 * `LISTED` most confused pairs. The full matrix stays in the eval file.
 *
 * An eval file is data from disk: every field is checked before use, and a malformed one is
 * shown as such, never as an exception.
 */
import { Effect } from "effect";
import { escapeHtml, figure, percent, text, thin } from "./report_markup.ts";
import { barSpec, heatmapSpec, lineSpec, renderSvg } from "./report_plots.ts";

/** Classes up to which the full confusion matrix is drawn. */
export const HEATMAP_MAX_CLASSES = 50;
/** Points of the sorted per-class accuracy curve above it. */
export const CURVE_POINTS = 400;
/** Rows of the lowest-accuracy and most-confused tables. */
export const LISTED = 20;
/** Characters of a class name shown (the file keeps the whole name). */
const NAME_CHARS = 60;

const isCount = (x: unknown): x is number => typeof x === "number" && Number.isFinite(x) && x >= 0;

/** The matrix when it is square `n` x `n` of counts, else undefined. */
const confusionOf = (value: unknown): number[][] | undefined => {
  if (!Array.isArray(value) || value.length === 0) return undefined;
  const n = value.length;
  return value.every((row) => Array.isArray(row) && row.length === n && row.every(isCount))
    ? value as number[][]
    : undefined;
};

/** Each class's accuracy: from the matrix when there is one, else the file's `per_class_accuracy`. */
const accuraciesOf = (confusion: number[][] | undefined, listed: unknown): (number | null)[] => {
  if (confusion !== undefined) {
    return confusion.map((row, c) => {
      const total = row.reduce((s, x) => s + x, 0);
      return total === 0 ? null : row[c]! / total;
    });
  }
  return Array.isArray(listed)
    ? listed.map((a) => typeof a === "number" && Number.isFinite(a) ? a : null)
    : [];
};

interface Pair {
  readonly truth: number;
  readonly predicted: number;
  readonly count: number;
  readonly share: number;
}

/** The `count` largest off-diagonal cells (ties by index), in one pass with a small sorted list. */
export const topConfusions = (confusion: readonly (readonly number[])[], count: number): Pair[] => {
  const top: Pair[] = [];
  confusion.forEach((row, truth) => {
    const total = row.reduce((s, x) => s + x, 0);
    row.forEach((cell, predicted) => {
      if (predicted === truth || cell <= 0) return;
      if (top.length === count && cell <= top[count - 1]!.count) return;
      const pair = { truth, predicted, count: cell, share: cell / total };
      let at = top.length;
      while (at > 0 && top[at - 1]!.count < cell) at -= 1;
      top.splice(at, 0, pair);
      if (top.length > count) top.pop();
    });
  });
  return top;
};

const table = (head: readonly string[], rows: readonly (readonly string[])[]) =>
  `<table class="summary"><thead><tr>${head.map((h) => `<th>${escapeHtml(h)}</th>`).join("")}</tr></thead>
<tbody>${
    rows.map((r) => `<tr>${r.map((cell) => `<td>${cell}</td>`).join("")}</tr>`).join("\n")
  }</tbody></table>`;

const summary = (
  names: readonly string[],
  confusion: number[][] | undefined,
  accuracy: readonly (number | null)[],
) =>
  Effect.gen(function* () {
    const ranked = accuracy.flatMap((a, c) => a === null ? [] : [{ c, a }]).sort((x, y) =>
      x.a - y.a || x.c - y.c
    );
    const parts: string[] = [];
    if (ranked.length > 0) {
      const curve = thin(ranked.map((r, i) => ({ rank: i + 1, accuracy: r.a })), CURVE_POINTS);
      const svg = yield* renderSvg(
        lineSpec(curve, { field: "rank", title: "classes, lowest accuracy first" }, {
          field: "accuracy",
          title: "accuracy",
          zero: true,
        }),
      );
      parts.push(figure(
        "per-class accuracy, sorted",
        svg,
        `${ranked.length} classes${ranked.length > CURVE_POINTS ? `, ${CURVE_POINTS} points drawn` : ""}`,
      ));
      parts.push(
        `<div><h4>${Math.min(LISTED, ranked.length)} lowest classes</h4>${
          table(
            ["class", "accuracy"],
            ranked.slice(0, LISTED).map((r) => [escapeHtml(names[r.c]!), percent(r.a, 1)]),
          )
        }</div>`,
      );
    }
    if (confusion !== undefined) {
      const pairs = topConfusions(confusion, LISTED);
      parts.push(
        `<div><h4>${pairs.length} most confused pairs</h4>${
          pairs.length === 0 ? `<p class="empty">no test image was misclassified</p>` : table(
            ["true class", "predicted", "images", "of the class"],
            pairs.map((p) => [
              escapeHtml(names[p.truth]!),
              escapeHtml(names[p.predicted]!),
              String(p.count),
              percent(p.share, 1),
            ]),
          )
        }</div>`,
      );
    }
    return parts.join("\n");
  });

const full = (
  names: readonly string[],
  confusion: number[][] | undefined,
  accuracy: readonly (number | null)[],
) =>
  Effect.gen(function* () {
    const cells = (confusion ?? []).flatMap((row, t) => {
      const rowMax = Math.max(...row);
      return row.map((count, p) => ({ truth: names[t]!, predicted: names[p]!, count, rowMax }));
    });
    const heat = cells.length === 0 ? "" : yield* renderSvg(heatmapSpec(cells, names));
    const bars = accuracy.length === 0 ? "" : yield* renderSvg(
      barSpec(
        accuracy.map((a, c) => ({ class: names[c]!, accuracy: a })),
        { field: "class", title: "class" },
        { field: "accuracy", title: "accuracy" },
      ),
    );
    return `${heat === "" ? "" : figure("confusion matrix", heat)}${
      bars === "" ? "" : figure("per-class accuracy", bars)
    }`;
  });

/** One evaluation's section; `result` is an eval file's JSON object, unchecked. */
export const renderEval = (result: Record<string, unknown>) =>
  Effect.gen(function* () {
    const confusion = confusionOf(result.confusion);
    const accuracy = accuraciesOf(confusion, result.per_class_accuracy);
    const count = confusion?.length ?? accuracy.length;
    const listed = Array.isArray(result.classes) ? result.classes : [];
    // Names as shown: short, and unique (a plot's axis merges equal names).
    const seen = new Set<string>();
    const names = Array.from({ length: count }, (_, c) => {
      const raw = c < listed.length
        ? (typeof listed[c] === "string" ? listed[c] : JSON.stringify(listed[c]))
        : "";
      let name = raw === "" || raw === undefined ? String(c) : raw;
      if (name.length > NAME_CHARS) name = `${name.slice(0, NAME_CHARS - 1)}…`;
      if (seen.has(name)) name = `${name} (${c})`;
      seen.add(name);
      return name;
    });
    const method = result.method === "knn"
      ? "kNN"
      : result.method === "linear"
      ? "linear probe"
      : result.method;
    const large = count > HEATMAP_MAX_CLASSES;
    const body = large ? yield* summary(names, confusion, accuracy) : yield* full(names, confusion, accuracy);
    const notes = [
      ...(large
        ? [
          `${count} classes: more than ${HEATMAP_MAX_CLASSES}, so the confusion matrix is summarised (the whole matrix is in the eval file)`,
        ]
        : []),
      ...(result.confusion !== undefined && confusion === undefined
        ? ["the confusion matrix in the eval file is not a square matrix of counts: not drawn"]
        : []),
    ];
    return `<section class="eval"><h3>${text(method, 40)}: top-1 ${percent(result.top1)}</h3>
<p class="meta">${text(result.checkpoint, 500)}${
      notes.map((n) => `<br><span class="note">${escapeHtml(n)}</span>`).join("")
    }</p>
<div class="grid">${body}</div></section>`;
  });
