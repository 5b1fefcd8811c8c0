/**
 * The small pieces every part of the report page is built from. Every value that comes from a run
 * folder (its JSON lines, config, eval files, class names, paths) reaches the page through `text`,
 * `escapeHtml` or a plot (Vega escapes what it writes into SVG): never pasted in raw.
 */

export const escapeHtml = (text: string): string =>
  text.replace(
    /[&<>"']/g,
    (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]!,
  );

/** Any value read from a file, as escaped text of at most `max` characters (a hostile name stays short). */
export const text = (value: unknown, max = 200): string => {
  const raw = typeof value === "string" ? value : value === undefined ? "" : JSON.stringify(value) ?? "";
  return escapeHtml(raw.length > max ? `${raw.slice(0, max - 1)}…` : raw);
};

/** A number read from a file, as `digits` decimals, or `?` when it is not a finite number. */
export const fixed = (value: unknown, digits: number): string =>
  typeof value === "number" && Number.isFinite(value) ? value.toFixed(digits) : "?";

/** A share in [0, 1] read from a file as a percentage, or `?`. */
export const percent = (value: unknown, digits = 2): string =>
  typeof value === "number" && Number.isFinite(value) ? `${(100 * value).toFixed(digits)}%` : "?";

/** At most `count` rows, evenly spaced, the first and last always kept: long runs stay light to draw. */
export const thin = <A>(rows: readonly A[], count: number): A[] =>
  rows.length <= count
    ? [...rows]
    : Array.from({ length: count }, (_, i) => rows[Math.round((i * (rows.length - 1)) / (count - 1))]!);

export const figure = (title: string, svg: string, note = "") =>
  `<figure class="plot"><figcaption>${escapeHtml(title)} <a class="cfg" href="#config">config</a>${
    note === "" ? "" : ` <span class="note">${escapeHtml(note)}</span>`
  }</figcaption>${svg}</figure>`;
