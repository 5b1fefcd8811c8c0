/**
 * What a run folder keeps for its report, beside `metrics.jsonl` (one line per step):
 *
 *   epochs.jsonl      one line per finished epoch: epoch, mean_loss, seconds, knn_top1 / online_probe_top1
 *                     where run, DeepCluster-v2's fill_seconds and kmeans_seconds (parts of seconds)
 *   events.jsonl      warnings with the step they fired at (the collapse check, skipped samples)
 *   eval-<method>.json  the last `eval --json` result of a checkpoint of this folder (confusion matrix included)
 *
 * Appends only: a resumed run adds lines, and readers keep the last line per epoch.
 */
import { Effect, Schema } from "effect";

/** A record file of the run folder could not be written. */
export class RunRecordError extends Schema.TaggedError<RunRecordError>()("RunRecordError", {
  path: Schema.String,
  message: Schema.String,
}) {}

const failWith = (path: string) => (error: unknown) =>
  new RunRecordError({
    path,
    message: `cannot write ${path}: ${error instanceof Error ? error.message : String(error)}`,
  });

/** One line of `epochs.jsonl`. */
export interface EpochRecord {
  readonly epoch: number;
  readonly mean_loss: number | null;
  /** The epoch's wall-clock seconds, its method's epoch start included. */
  readonly seconds?: number;
  readonly knn_top1?: number;
  readonly online_probe_top1?: number;
  /** DeepCluster-v2 only: the memory bank's first fill (0 after the first epoch) and the k-means, seconds. */
  readonly fill_seconds?: number;
  readonly kmeans_seconds?: number;
}

/** One line of `events.jsonl`. */
export interface EventRecord {
  readonly step: number;
  readonly kind: string;
  readonly text: string;
}

/** What the pretrain loop reports per epoch (structurally: the fields this file keeps). */
export interface EpochLike {
  readonly epoch: number;
  readonly meanLoss: number;
  readonly seconds?: number | undefined;
  readonly knnTop1?: number | undefined;
  readonly onlineProbeTop1?: number | undefined;
  readonly fillSeconds?: number | undefined;
  readonly kmeansSeconds?: number | undefined;
}

export const epochRecord = (report: EpochLike): EpochRecord => ({
  epoch: report.epoch,
  mean_loss: Number.isFinite(report.meanLoss) ? report.meanLoss : null,
  ...(report.seconds === undefined ? {} : { seconds: report.seconds }),
  ...(report.knnTop1 === undefined ? {} : { knn_top1: report.knnTop1 }),
  ...(report.onlineProbeTop1 === undefined ? {} : { online_probe_top1: report.onlineProbeTop1 }),
  ...(report.fillSeconds === undefined ? {} : { fill_seconds: report.fillSeconds }),
  ...(report.kmeansSeconds === undefined ? {} : { kmeans_seconds: report.kmeansSeconds }),
});

const appendLine = (path: string, value: unknown) =>
  Effect.tryPromise({
    try: () => Deno.writeTextFile(path, JSON.stringify(value) + "\n", { append: true, create: true }),
    catch: failWith(path),
  });

/** The appenders of a run folder's `epochs.jsonl` and `events.jsonl`. */
export const runRecords = (folder: string) => ({
  epoch: (report: EpochLike) => appendLine(`${folder}/epochs.jsonl`, epochRecord(report)),
  event: (step: number, kind: string, text: string) =>
    appendLine(`${folder}/events.jsonl`, { step, kind, text } satisfies EventRecord),
});

/** The run folder of a checkpoint file (`.../checkpoint-N.swav`), or undefined for an exported encoder. */
export const runFolderOfCheckpoint = (checkpoint: string): string | undefined => {
  if (!/checkpoint-\d+\.swav$/.test(checkpoint)) return undefined;
  const slash = checkpoint.lastIndexOf("/");
  return slash < 0 ? "." : checkpoint.slice(0, slash) || "/";
};

/**
 * The file an evaluation is kept in: `eval-<method>.json` for the run's own splits (what the
 * report shows), `eval-<method>-<8 hex digits>.json` for other sources (`--train/--test`), keyed
 * by the two source specs, so an evaluation on other data never replaces the run's own; the
 * JSON names its sources (`train_source`, `test_source`, `own_splits`).
 */
export const evalRecordName = async (json: Record<string, unknown>): Promise<string> => {
  const method = String(json.method);
  if (json.own_splits !== false) return `eval-${method}.json`;
  const key = new TextEncoder().encode(`${json.train_source}\n${json.test_source}`);
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", key));
  const hex = [...digest.slice(0, 4)].map((b) => b.toString(16).padStart(2, "0")).join("");
  return `eval-${method}-${hex}.json`;
};

/**
 * Writes an evaluation's JSON (`evaluationJson`'s shape: method, top1, confusion, ...) as
 * `evalRecordName` says into the run folder of the checkpoint it evaluated, atomically.
 * Returns the path, or undefined when the checkpoint is not in a run folder (an exported encoder).
 */
export const writeEvalRecord = (json: Record<string, unknown>) =>
  Effect.gen(function* () {
    const checkpoint = typeof json.checkpoint === "string" ? json.checkpoint : "";
    const folder = runFolderOfCheckpoint(checkpoint);
    const method = typeof json.method === "string" ? json.method : "";
    if (folder === undefined || !/^[a-z]+$/.test(method)) return undefined;
    const path = `${folder}/${yield* Effect.promise(() => evalRecordName(json))}`;
    const temp = `${path}.${crypto.randomUUID()}.tmp`;
    yield* Effect.tryPromise({
      try: async () => {
        await Deno.writeTextFile(temp, JSON.stringify(json, null, 2) + "\n");
        await Deno.rename(temp, path);
      },
      catch: failWith(path),
    }).pipe(Effect.tapError(() => Effect.promise(() => Deno.remove(temp).catch(() => undefined))));
    return path;
  });

/** `demo.json`: the demo's own result, SwAV's kNN top-1 beside the same network at its initialisation. */
export interface DemoRecord {
  readonly swav_knn_top1: number;
  readonly random_init_knn_top1: number;
  readonly knn_k: number;
  readonly knn_temperature: number;
  readonly classes: number;
  readonly epochs: number;
  readonly seconds: number;
}

/** Writes the demo's result into its run folder (the report shows it); the file's path. */
export const writeDemoRecord = (folder: string, record: DemoRecord) =>
  Effect.tryPromise({
    try: () => Deno.writeTextFile(`${folder}/demo.json`, JSON.stringify(record, null, 2) + "\n"),
    catch: failWith(`${folder}/demo.json`),
  }).pipe(Effect.as(`${folder}/demo.json`));
