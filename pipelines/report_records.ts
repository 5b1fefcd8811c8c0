/**
 * The text records of a run folder as the report reads them: config.json, metrics.jsonl,
 * epochs.jsonl, events.jsonl and eval-*.json. A missing or half-written file reads as empty, never
 * as an error; the dashboard re-reads them while the run writes them.
 *
 * Every read is bounded, whatever the folder holds: the JSON lines files are streamed in chunks
 * and only a thinned sample of their rows is kept (`KEEP_ROWS`, evenly spaced, the last row always
 * kept), so an 800-epoch run's metrics.jsonl of hundreds of MB costs time, not memory; the JSON
 * files are read with the bounded reader under a cap each, and a file over its cap is named in
 * `notes` instead of being read. Only regular files are opened (never a FIFO or a device).
 */
import { Effect } from "effect";
import { readRegularFile, regularFileSize } from "./bounded_read.ts";
import type { StepMetrics } from "./pretrain.ts";
import type { EpochRecord, EventRecord } from "./run_records.ts";

/** The text files of a run folder, parsed. */
export interface RunRecords {
  readonly folder: string;
  /** config.json as written (undefined when absent or unreadable). */
  readonly config: Record<string, unknown> | undefined;
  /** One per step, the last line wins when a resumed run repeated a step; sorted by step; thinned. */
  readonly metrics: readonly StepMetrics[];
  readonly epochs: readonly EpochRecord[];
  /** The last `KEEP_EVENTS` warnings, and how many there are in all. */
  readonly events: readonly EventRecord[];
  readonly eventCount?: number;
  /** eval-<method>.json files, sorted by method. */
  readonly evals: readonly Record<string, unknown>[];
  /** demo.json: the demo's kNN result, SwAV against random initialisation (demo runs only). */
  readonly demo?: Record<string, unknown> | undefined;
  /** Files that were too large (or not regular files) to read, in words. */
  readonly notes?: readonly string[];
}

/** Rows kept of metrics.jsonl and epochs.jsonl (between this and twice this), and warnings kept. */
export const KEEP_ROWS = 4000;
export const KEEP_EVENTS = 1000;
/** Caps of the files read whole. */
export const CONFIG_CAP = 1 << 20;
export const EVAL_CAP = 64 << 20;
/** A line longer than this is not a record the program wrote: skipped unparsed. */
const LINE_CAP = 1 << 20;

/** Lines that parse as JSON objects; a half-written last line is skipped. */
export const parseJsonLines = (text: string): Record<string, unknown>[] =>
  text.split("\n").flatMap((line) => {
    const value = parseObject(line);
    return value === undefined ? [] : [value];
  });

const parseObject = (text: string): Record<string, unknown> | undefined => {
  if (text.trim() === "") return undefined;
  try {
    const value = JSON.parse(text);
    return typeof value === "object" && value !== null && !Array.isArray(value) ? value : undefined;
  } catch {
    return undefined;
  }
};

/** Calls `onLine` with each complete line of a regular file, reading 1 MiB at a time. */
const eachLine = (path: string, onLine: (line: string) => void): Effect.Effect<void> =>
  Effect.gen(function* () {
    const size = yield* Effect.option(regularFileSize(path, Number.MAX_SAFE_INTEGER));
    if (size._tag === "None") return;
    yield* Effect.promise(async () => {
      try {
        using file = await Deno.open(path, { read: true });
        const decoder = new TextDecoder();
        const chunk = new Uint8Array(1 << 20);
        let carry = "";
        let skipping = false;
        // Up to the size seen at the start: a file that grows meanwhile is read next time.
        for (let left = size.value; left > 0;) {
          const n = await file.read(chunk.subarray(0, Math.min(chunk.length, left)));
          if (n === null) break;
          left -= n;
          const lines = (carry + decoder.decode(chunk.subarray(0, n), { stream: true })).split("\n");
          carry = lines.pop()!;
          for (const line of lines) {
            if (!skipping) onLine(line);
            skipping = false;
          }
          if (carry.length > LINE_CAP) {
            carry = "";
            skipping = true;
          }
        }
        // The last line without its newline may be half-written: parsed if it parses.
        if (!skipping) onLine(carry);
      } catch {
        // gone or unreadable meanwhile: what was read stays
      }
    });
  });

/**
 * Rows keyed by `key`, thinned while they stream in: past 2 x `keep` rows every second one is
 * dropped and from then on only every `stride`-th row is taken, so the rows kept stay evenly
 * spaced. A key at or below the last one kept (a resumed run rewinding) replaces what it repeats.
 */
export const thinningRows = <A>(keep: number, key: (row: A) => number) => {
  let rows: A[] = [];
  let stride = 1;
  let seen = 0;
  let last: A | undefined;
  return {
    add: (row: A) => {
      const k = key(row);
      if (rows.length > 0 && k <= key(rows.at(-1)!)) {
        // Sorted by key: cut at the first kept row whose key is k or more (binary search).
        let lo = 0;
        for (let hi = rows.length; lo < hi;) {
          const mid = (lo + hi) >> 1;
          if (key(rows[mid]!) < k) lo = mid + 1;
          else hi = mid;
        }
        rows.length = lo;
      }
      last = row;
      if (seen++ % stride === 0) rows.push(row);
      if (rows.length >= 2 * keep) {
        rows = rows.filter((_, i) => i % 2 === 0);
        stride *= 2;
      }
    },
    rows: (): A[] => last === undefined || rows.at(-1) === last ? rows : [...rows, last],
  };
};

const jsonLines = <A>(
  path: string,
  isRow: (row: Record<string, unknown>) => boolean,
  key: (row: A) => number,
) =>
  Effect.gen(function* () {
    const kept = thinningRows<A>(KEEP_ROWS, key);
    yield* eachLine(path, (line) => {
      const row = parseObject(line);
      if (row !== undefined && isRow(row)) kept.add(row as A);
    });
    return kept.rows();
  });

/** A JSON object file under `cap`: the object, undefined when absent or malformed, a note when too large. */
const jsonFile = (path: string, cap: number) =>
  readRegularFile(path, cap).pipe(
    Effect.map((bytes) => ({ value: parseObject(new TextDecoder().decode(bytes)), note: undefined })),
    Effect.catch((error) =>
      Effect.succeed({
        value: undefined,
        note: /no such file/.test(error.reason) ? undefined : `${error.message}: not read`,
      })
    ),
  );

const evalFileNames = (folder: string) =>
  Effect.promise(async () => {
    const names: string[] = [];
    try {
      for await (const entry of Deno.readDir(folder)) {
        if (entry.isFile && /^eval-[a-z]+\.json$/.test(entry.name)) names.push(entry.name);
      }
    } catch {
      // a missing folder has no evaluations
    }
    return names.sort();
  });

/** Reads a run folder's records; never fails (what is missing is empty). */
export const readRunRecords = (folder: string): Effect.Effect<RunRecords> =>
  Effect.gen(function* () {
    const isNumber = (key: string) => (row: Record<string, unknown>) => typeof row[key] === "number";
    const metrics = yield* jsonLines<StepMetrics>(`${folder}/metrics.jsonl`, isNumber("step"), (m) => m.step);
    const epochs = yield* jsonLines<EpochRecord>(`${folder}/epochs.jsonl`, isNumber("epoch"), (e) => e.epoch);
    const events: EventRecord[] = [];
    let eventCount = 0;
    yield* eachLine(`${folder}/events.jsonl`, (line) => {
      const row = parseObject(line);
      if (row === undefined || typeof row.step !== "number") return;
      eventCount += 1;
      events.push(row as unknown as EventRecord);
      if (events.length > 2 * KEEP_EVENTS) events.splice(0, events.length - KEEP_EVENTS);
    });
    const notes: string[] = [];
    const evals: Record<string, unknown>[] = [];
    for (const name of yield* evalFileNames(folder)) {
      const read = yield* jsonFile(`${folder}/${name}`, EVAL_CAP);
      if (read.value !== undefined) evals.push(read.value);
      if (read.note !== undefined) notes.push(read.note);
    }
    const config = yield* jsonFile(`${folder}/config.json`, CONFIG_CAP);
    if (config.note !== undefined) notes.push(config.note);
    const demo = yield* jsonFile(`${folder}/demo.json`, CONFIG_CAP);
    if (demo.note !== undefined) notes.push(demo.note);
    return {
      folder,
      config: config.value,
      metrics,
      epochs,
      events: events.slice(-KEEP_EVENTS),
      eventCount,
      evals,
      demo: demo.value,
      notes,
    };
  });
