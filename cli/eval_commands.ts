/**
 * `eval`, `extract` and `export` subcommands (added to `cli/main.ts`):
 *
 *   eval --checkpoint PATH [--train SOURCE] [--test SOURCE] --method knn|linear [--json]
 *   extract --checkpoint PATH [--data SOURCE] --out DIR
 *   export --checkpoint PATH --out DIR
 *
 * PATH is a checkpoint file, a run folder (its latest checkpoint) or an
 * exported encoder folder. Progress goes to stderr; stdout carries the result
 * (one JSON line with `--json`). Failures print one line and exit 1.
 */
import { Effect, Option } from "effect";
import { Command, Flag } from "effect/cli";
import { BackendName, TensorBackend } from "../backend/tensor_backend.ts";
import { evaluate, evaluationJson, exportCheckpointEncoder, extractToFolder } from "../pipelines/evaluate.ts";
import { writeEvalRecord } from "../pipelines/run_records.ts";
import { reportFailure } from "./report.ts";

const checkpointFlag = Flag.String("checkpoint").pipe(
  Flag.withDescription(
    "a checkpoint file, a run folder (its latest checkpoint) or an exported encoder folder",
  ),
);
const backendFlag = Flag.Literals("backend", BackendName.literals).pipe(
  Flag.withDescription("tensor backend (default: SWAV_BACKEND, else auto)"),
  Flag.optional,
);
const batchSizeFlag = Flag.Int("batch-size").pipe(
  Flag.withDescription("images per feature-extraction batch (default 256)"),
  Flag.optional,
);
const workersFlag = Flag.Int("workers").pipe(
  Flag.withDescription("data worker threads (default: the run's data.workers)"),
  Flag.optional,
);

/** Warnings (a damaged checkpoint skipped, an older file loaded unverified) on stderr, one line each. */
const printWarning = (message: string) =>
  console.error(`warning: ${message.trim().replace(/\s*\n\s*/g, " ")}`);

/** The backend: an explicit flag wins, then SWAV_BACKEND, then auto (the layer reads the variable). */
const backendLayer = (flag: Option.Option<BackendName>) => TensorBackend.layer(Option.getOrUndefined(flag));

/** Progress lines on stderr: rewritten in place on a terminal, every 10 s (and at the end) otherwise. */
const progressPrinter = () => {
  let tty = false;
  try {
    tty = Deno.stderr.isTerminal();
  } catch {
    // no terminal
  }
  const encoder = new TextEncoder();
  const started = performance.now();
  let lastPlain = 0;
  let lastPhase = "";
  return (phase: string, done: number, total: number) => {
    const seconds = (performance.now() - started) / 1000;
    const line = `${phase} ${done}/${total} (${seconds.toFixed(0)} s)`;
    if (tty) {
      Deno.stderr.writeSync(encoder.encode(`\r\x1b[2K${line}${done === total ? "\n" : ""}`));
    } else if (phase !== lastPhase || done === total || performance.now() - lastPlain > 10_000) {
      lastPlain = performance.now();
      lastPhase = phase;
      Deno.stderr.writeSync(encoder.encode(`${line}\n`));
    }
  };
};

const percent = (x: number) => `${(100 * x).toFixed(2)}%`;

export const evalCommand = Command.make("eval", {
  checkpoint: checkpointFlag,
  train: Flag.String("train").pipe(
    Flag.withDescription("labelled SOURCE to fit on (default: the run's data set, train split)"),
    Flag.optional,
  ),
  test: Flag.String("test").pipe(
    Flag.withDescription(
      "labelled SOURCE to score (default: the run's data.testSource, else its test split)",
    ),
    Flag.optional,
  ),
  method: Flag.Literals("method", ["knn", "linear"]).pipe(
    Flag.withDescription("knn: weighted k-nearest neighbours; linear: a linear probe on frozen features"),
    Flag.withDefault("knn" as const),
  ),
  k: Flag.Int("k").pipe(
    Flag.withDescription("kNN neighbours (default: the run's train.knnK, 200)"),
    Flag.optional,
  ),
  temperature: Flag.Finite("temperature").pipe(
    Flag.withDescription("kNN vote weight exp(sim / temperature) (default 0.1)"),
    Flag.optional,
  ),
  epochs: Flag.Int("epochs").pipe(Flag.withDescription("linear probe epochs (default 100)"), Flag.optional),
  lr: Flag.Finite("lr").pipe(Flag.withDescription("linear probe learning rate (default 0.3)"), Flag.optional),
  probeBatchSize: Flag.Int("probe-batch-size").pipe(
    Flag.withDescription("linear probe batch (default 256)"),
    Flag.optional,
  ),
  batchSize: batchSizeFlag,
  workers: workersFlag,
  backend: backendFlag,
  json: Flag.Boolean("json").pipe(
    Flag.withDescription("print one JSON line {method, top1, top5, ...} (fractions in [0, 1])"),
    Flag.withDefault(false),
  ),
}, (flags) =>
  reportFailure(Effect.gen(function* () {
    const progress = progressPrinter();
    const result = yield* evaluate({
      checkpoint: flags.checkpoint,
      method: flags.method,
      train: Option.getOrUndefined(flags.train),
      test: Option.getOrUndefined(flags.test),
      k: Option.getOrUndefined(flags.k),
      temperature: Option.getOrUndefined(flags.temperature),
      epochs: Option.getOrUndefined(flags.epochs),
      lr: Option.getOrUndefined(flags.lr),
      probeBatchSize: Option.getOrUndefined(flags.probeBatchSize),
      batchSize: Option.getOrUndefined(flags.batchSize),
      workers: Option.getOrUndefined(flags.workers),
      onProgress: progress,
      onWarning: printWarning,
    }).pipe(Effect.provide(backendLayer(flags.backend)));
    if (flags.json) {
      // Kept beside the checkpoint for the run report; a folder that cannot be written only warns.
      yield* writeEvalRecord(evaluationJson(result)).pipe(
        Effect.catch((e) => Effect.sync(() => console.error(`warning: ${e.message}`))),
      );
      console.log(JSON.stringify(evaluationJson(result)));
      return;
    }
    const lines = [
      `${
        result.method === "knn" ? `kNN (k ${result.k}, temperature ${result.temperature})` : "linear probe"
      } on ` +
      `${result.trainSamples} train / ${result.testSamples} test samples, ${result.checkpoint}`,
      result.method === "knn"
        ? `top-1 ${percent(result.top1)}  top-5 ${percent(result.top5)}`
        : `best top-1 ${percent(result.top1)} (epoch ${result.bestEpoch}/${result.epochs}), top-5 ${
          percent(result.top5)
        }; last top-1 ${percent(result.lastTop1)}, top-5 ${percent(result.lastTop5)}`,
      "per class: " + result.classes.map((c, i) => `${c} ${percent(result.perClassAccuracy[i]!)}`).join(", "),
    ];
    console.log(lines.join("\n"));
  }))).pipe(
    Command.withDescription("Evaluate a checkpoint: kNN or a linear probe on frozen backbone features"),
  );

export const extractCommand = Command.make("extract", {
  checkpoint: checkpointFlag,
  data: Flag.String("data").pipe(
    Flag.withDescription("SOURCE to extract (default: the run's data set, train split)"),
    Flag.optional,
  ),
  out: Flag.String("out").pipe(
    Flag.withDescription(
      "folder for features.npy (float32 [N, D]), labels.npy, indices.npy (int64), features.json",
    ),
  ),
  batchSize: batchSizeFlag,
  workers: workersFlag,
  backend: backendFlag,
}, (flags) =>
  reportFailure(Effect.gen(function* () {
    const progress = progressPrinter();
    const sidecar = yield* extractToFolder({
      checkpoint: flags.checkpoint,
      data: Option.getOrUndefined(flags.data),
      out: flags.out,
      batchSize: Option.getOrUndefined(flags.batchSize),
      workers: Option.getOrUndefined(flags.workers),
      onProgress: (done, total) => progress("features", done, total),
      onWarning: printWarning,
    }).pipe(Effect.provide(backendLayer(flags.backend)));
    console.log(`${sidecar.count} x ${sidecar.dim} features of ${sidecar.source} written to ${flags.out}`);
  }))).pipe(Command.withDescription("Write pooled backbone features of a source as NumPy .npy files"));

export const exportCommand = Command.make("export", {
  checkpoint: checkpointFlag,
  out: Flag.String("out").pipe(
    Flag.withDescription(
      "tfjs: a folder for model.json + weights.bin; safetensors / onnx: the file to write",
    ),
  ),
  format: Flag.Literals("format", ["tfjs", "safetensors", "onnx"] as const).pipe(
    Flag.withDescription("tfjs (TF.js weights, default), safetensors (torchvision names) or onnx (opset 13)"),
    Flag.withDefault("tfjs" as const),
  ),
  head: Flag.Boolean("head").pipe(
    Flag.withDescription("safetensors / onnx: include the projection head and prototypes"),
    Flag.withDefault(false),
  ),
  backend: backendFlag,
}, (flags) =>
  reportFailure(Effect.gen(function* () {
    const written = yield* exportCheckpointEncoder(flags.checkpoint, flags.out, printWarning, {
      format: flags.format,
      head: flags.head,
    }).pipe(Effect.provide(backendLayer(flags.backend)));
    console.log(
      flags.format === "tfjs"
        ? `encoder written to ${written}/model.json and ${written}/weights.bin`
        : `encoder written to ${written} (${flags.format})`,
    );
  }))).pipe(
    Command.withDescription(
      "Export the trained backbone as TF.js weights, safetensors or ONNX for other tools",
    ),
  );
