/**
 * A grid's report (the sweep's and the ablation's): grouped bar charts of kNN
 * and linear top-1 and a table, in one HTML page in the run report's Vega
 * style; the sweep's table as Markdown and `sweep.json`.
 */
import { Effect } from "effect";
import { escapeHtml } from "./report_html.ts";
import { groupedBarSpec, renderSvg } from "./report_plots.ts";
import type { SweepAxis, SweepCellResult } from "./sweep.ts";

/** One bar: its group on the x axis, its series within the group, its top-1 in %. */
export interface GridBar {
  readonly group: string;
  readonly series: string;
  readonly knn: number;
  readonly linear: number;
}

/**
 * The HTML page: one grouped bar chart per score (kNN, and linear where any bar has it), then the
 * table (`header` and `rows` as text; the first column left-aligned).
 */
export const gridReportHtml = (
  options: {
    readonly title: string;
    readonly heading: string;
    readonly axes: { readonly group: string; readonly series: string };
    readonly bars: readonly GridBar[];
    readonly header: readonly string[];
    readonly rows: readonly (readonly string[])[];
  },
) =>
  Effect.gen(function* () {
    const { axes, bars } = options;
    const chart = (key: "knn" | "linear", title: string) =>
      renderSvg(groupedBarSpec(
        // Fixed field names: Vega reads a dot in a field name ("train.method") as a nested field.
        bars.map((b) => ({ group: b.group, series: b.series, top1: b[key] })),
        { field: "group", title: axes.group },
        { field: "series", title: axes.series },
        { field: "top1", title },
      ));
    const figures = [yield* chart("knn", "kNN top-1 (%)")];
    if (bars.some((b) => Number.isFinite(b.linear))) figures.push(yield* chart("linear", "linear top-1 (%)"));
    const cells = (tag: string, row: readonly string[]) =>
      row.map((text) => `<${tag}>${escapeHtml(text)}</${tag}>`).join("");
    return `<!doctype html><html><head><meta charset="utf-8"><title>${escapeHtml(options.title)}</title>
<style>body{font:14px/1.4 sans-serif;margin:1.5em auto;max-width:1000px;color:#222;padding:0 1em}
td,th{padding:2px 8px;text-align:right}td:first-child{text-align:left}</style></head><body>
<h1>${escapeHtml(options.heading)}</h1>${figures.map((svg) => `<figure>${svg}</figure>`).join("")}
<table><thead><tr>${cells("th", options.header)}</tr></thead><tbody>${
      options.rows.map((row) => `<tr>${cells("td", row)}</tr>`).join("")
    }</tbody></table>
</body></html>`;
  });

const pct = (x: number) => Number.isFinite(x) ? (100 * x).toFixed(2) : "-";
/** A value as the table shows it: its JSON. */
const shown = (value: unknown) => JSON.stringify(value);

/** The sweep's table: one column per grid key, then kNN and linear top-1 (%) and the steps trained. */
export const sweepTable = (axes: readonly SweepAxis[], cells: readonly SweepCellResult[]) => ({
  header: [...axes.map((a) => a.key), "kNN top-1", "linear top-1", "steps"],
  rows: cells.map((c) => [
    ...axes.map((a) => shown(c.settings[a.key])),
    pct(c.knnTop1),
    pct(c.linearTop1),
    String(c.steps),
  ]),
});

/** The table as Markdown (`|` inside a value escaped). */
export const sweepMarkdown = (axes: readonly SweepAxis[], cells: readonly SweepCellResult[]): string => {
  const { header, rows } = sweepTable(axes, cells);
  const line = (row: readonly string[]) => `| ${row.map((t) => t.replaceAll("|", "\\|")).join(" | ")} |`;
  return [
    line(header),
    `| ${header.map((_, i) => i < axes.length ? "---" : "---:").join(" | ")} |`,
    ...rows.map(line),
  ].join("\n") + "\n";
};

/** Writes `sweep.json`, `sweep.md` and `sweep.html` to `out`. */
export const writeSweepReport = (
  out: string,
  axes: readonly SweepAxis[],
  cells: readonly SweepCellResult[],
) =>
  Effect.gen(function* () {
    const { header, rows } = sweepTable(axes, cells);
    // The first key's values along the x axis, the other keys' values as the bars of a group.
    const bars = cells.map((c) => ({
      group: axes.length > 0 ? shown(c.settings[axes[0]!.key]) : c.name,
      series: axes.length > 1 ? axes.slice(1).map((a) => shown(c.settings[a.key])).join(" ") : "cell",
      knn: 100 * c.knnTop1,
      linear: 100 * c.linearTop1,
    }));
    const html = yield* gridReportHtml({
      title: "sweep",
      heading: `Sweep: ${axes.map((a) => a.key).join(" x ")}`,
      axes: {
        group: axes[0]?.key ?? "cell",
        series: axes.length > 1 ? axes.slice(1).map((a) => a.key).join(" ") : "cells",
      },
      bars,
      header,
      rows,
    });
    yield* Effect.promise(async () => {
      await Deno.writeTextFile(
        `${out}/sweep.json`,
        JSON.stringify({ grid: axes.map((a) => ({ key: a.key, values: a.values })), cells }, null, 2),
      );
      await Deno.writeTextFile(`${out}/sweep.md`, sweepMarkdown(axes, cells));
      await Deno.writeTextFile(`${out}/sweep.html`, html);
    });
  });
