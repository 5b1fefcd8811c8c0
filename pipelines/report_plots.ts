/**
 * The report's plots: Vega-Lite specs compiled to Vega and rendered to SVG by Vega's headless
 * view (no canvas, no DOM), so every plot is an inline `<svg>` element of the page.
 *
 * Specs avoid what Vega numbers per process (clip paths, gradient legends), so the same data
 * give the same SVG text in any process, any number of times.
 */
import { Effect } from "effect";
import * as vega from "vega";
import { compile, type TopLevelSpec } from "vega-lite";

type Row = Record<string, number | string | null>;

const base = { width: 400, height: 180, config: { font: "sans-serif", view: { stroke: "#ddd" } } } as const;

/** Renders a Vega-Lite spec to an SVG string. */
export const renderSvg = (spec: TopLevelSpec): Effect.Effect<string> =>
  Effect.promise(async () => {
    const view = new vega.View(vega.parse(compile(spec).spec), { renderer: "none" });
    try {
      return await view.toSVG();
    } finally {
      view.finalize();
    }
  });

/** A line over steps (or epochs), optionally with horizontal reference rules. */
export const lineSpec = (
  rows: readonly Row[],
  x: { field: string; title: string },
  y: { field: string; title: string; zero?: boolean },
  rules: readonly { value: number; label: string }[] = [],
  colour?: string,
): TopLevelSpec => ({
  ...base,
  layer: [
    {
      data: { values: rows as Row[] },
      mark: { type: "line", point: rows.length < 40, strokeWidth: 1.5 },
      encoding: {
        x: { field: x.field, type: "quantitative", title: x.title },
        y: { field: y.field, type: "quantitative", title: y.title, scale: { zero: y.zero ?? false } },
        ...(colour === undefined ? {} : { color: { field: colour, type: "nominal", title: null } }),
      },
    },
    ...rules.length === 0 ? [] : [
      {
        data: { values: rules.map((r) => ({ value: r.value, label: r.label })) },
        encoding: {
          y: { field: "value", type: "quantitative" as const },
        },
        layer: [
          { mark: { type: "rule" as const, strokeDash: [4, 4], color: "#c0392b" } },
          {
            mark: { type: "text" as const, align: "left" as const, dx: 4, dy: -6, color: "#c0392b" },
            encoding: {
              text: { field: "label", type: "nominal" as const },
              x: { datum: 0, type: "quantitative" as const },
            },
          },
        ],
      },
    ],
  ],
} as TopLevelSpec);

/** Bars of `y` per `x` (nominal or ordinal `x`, in the given order). */
export const barSpec = (
  rows: readonly Row[],
  x: { field: string; title: string; labels?: boolean },
  y: { field: string; title: string },
  width = 460,
): TopLevelSpec => ({
  ...base,
  width,
  data: { values: rows as Row[] },
  mark: { type: "bar", color: "#4c78a8" },
  encoding: {
    x: {
      field: x.field,
      type: "ordinal",
      title: x.title,
      sort: null,
      axis: x.labels === false ? { labels: false, ticks: false } : { labelAngle: -45 },
    },
    y: { field: y.field, type: "quantitative", title: y.title },
  },
});

/** A scatter of 2-D points, coloured by a nominal field when given. */
export const scatterSpec = (
  rows: readonly Row[],
  colour: string | undefined,
  legend = true,
): TopLevelSpec => ({
  ...base,
  width: 460,
  height: 400,
  data: { values: rows as Row[] },
  mark: { type: "circle", size: 14, opacity: 0.8 },
  encoding: {
    x: { field: "x", type: "quantitative", title: "UMAP 1", scale: { zero: false } },
    y: { field: "y", type: "quantitative", title: "UMAP 2", scale: { zero: false } },
    ...(colour === undefined ? {} : {
      color: {
        field: colour,
        type: "nominal",
        title: "class",
        scale: { scheme: "category20" },
        ...(legend ? {} : { legend: null }),
      },
    }),
  },
});

/** A confusion matrix: one cell per (truth, predicted), its count written in it. */
export const heatmapSpec = (rows: readonly Row[], classes: readonly string[]): TopLevelSpec => {
  const side = Math.min(460, Math.max(200, classes.length * 28));
  return {
    ...base,
    width: side,
    height: side,
    data: { values: rows as Row[] },
    encoding: {
      x: {
        field: "predicted",
        type: "ordinal",
        sort: [...classes],
        title: "predicted",
        axis: { labelAngle: -45 },
      },
      y: { field: "truth", type: "ordinal", sort: [...classes], title: "true class" },
    },
    layer: [
      {
        mark: "rect",
        encoding: {
          color: { field: "count", type: "quantitative", scale: { scheme: "blues" }, legend: null },
        },
      },
      {
        mark: { type: "text", fontSize: 9 },
        encoding: {
          text: { field: "count", type: "quantitative" },
          color: { condition: { test: "datum.count > datum.rowMax / 2", value: "white" }, value: "black" },
        },
      },
    ],
  } as TopLevelSpec;
};

/** Bars grouped along x by `group`, one colour per `series` (the ablation's method x crops figure). */
export const groupedBarSpec = (
  rows: readonly Row[],
  group: { field: string; title: string },
  series: { field: string; title: string },
  y: { field: string; title: string },
): TopLevelSpec => ({
  ...base,
  data: { values: rows as Row[] },
  mark: { type: "bar" },
  encoding: {
    x: { field: group.field, type: "nominal", title: group.title, sort: null, axis: { labelAngle: 0 } },
    xOffset: { field: series.field, sort: null },
    color: { field: series.field, type: "nominal", title: series.title, sort: null },
    y: { field: y.field, type: "quantitative", title: y.title },
  },
});
