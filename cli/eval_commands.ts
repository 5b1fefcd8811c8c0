/**
 * `eval`, `extract` and `export` subcommands (added to `cli/main.ts`):
 *
 *   eval --checkpoint PATH [--train SOURCE] [--test SOURCE] --method knn|linear|semisup [--json]
 *        [--protocol paper|features] [--pooling global|avgpool] [--bn] [--labels 1%|10%|FILE]
 *        [--resize auto|none|N]
 *   extract --checkpoint PATH [--data SOURCE] --out DIR [--resize auto|none|N]
 *   export --checkpoint PATH --out DIR
 *
 * PATH is a checkpoint file, a run folder (its latest checkpoint) or an
 * exported encoder folder. Progress goes to stderr; stdout carries the result
 * (one JSON line with `--json`). Failures print one line and exit 1.
 */
import { Effect, Option, Schema } from "effect";
import { Command, Flag } from "effect/cli";
import { BackendName, TensorBackend } from "../backend/tensor_backend.ts";
import {
  evaluate,
  type Evaluation,
  evaluationJson,
  parseResizeOption,
  type ResizeOption,
} from "../pipelines/evaluate.ts";
import { exportCheckpointEncoder, extractToFolder } from "../pipelines/extract_folder.ts";
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
const resizeFlag = Flag.String("resize").pipe(
  Flag.withDescription(
    "test-time Resize (shorter side) before CenterCrop(crop size): auto (int(size x 256 / 224), the " +
      "reference's 256 for 224), none, or N pixels",
  ),
  Flag.optional,
);

/** A flag combination or value the command cannot use. */
export class EvalFlagError extends Schema.TaggedError<EvalFlagError>()("EvalFlagError", {
  message: Schema.String,
}) {}

const resizeOf = (flag: Option.Option<string>): Effect.Effect<ResizeOption | undefined, EvalFlagError> => {
  if (Option.isNone(flag)) return Effect.succeed(undefined);
  const value = parseResizeOption(flag.value);
  return value === undefined
    ? Effect.fail(
      new EvalFlagError({ message: `--resize ${flag.value}: give auto, none or a size in pixels` }),
    )
    : Effect.succeed(value);
};

/** Flags that belong to another method or protocol: named in one line rather than ignored. */
const misplacedFlag = (flags: {
  method: string;
  protocol: Option.Option<string>;
  pooling: Option.Option<string>;
  bn: boolean;
  labels: Option.Option<string>;
  lrHead: Option.Option<number>;
  k: Option.Option<number>;
  temperature: Option.Option<number>;
}): string | undefined => {
  const { method } = flags;
  if (Option.isSome(flags.protocol) && method !== "linear") return "--protocol applies to --method linear";
  if (Option.isSome(flags.labels) && method !== "semisup") return "--labels applies to --method semisup";
  if (Option.isSome(flags.lrHead) && method !== "semisup") return "--lr-head applies to --method semisup";
  if ((Option.isSome(flags.k) || Option.isSome(flags.temperature)) && method !== "knn") {
    return "--k and --temperature apply to --method knn";
  }
  if (
    (Option.isSome(flags.pooling) || flags.bn) &&
    !(method === "linear" && Option.getOrUndefined(flags.protocol) !== "features")
  ) {
    return "--pooling and --bn apply to --method linear --protocol paper";
  }
  return undefined;
};

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
  method: Flag.Literals("method", ["knn", "linear", "semisup"]).pipe(
    Flag.withDescription(
      "knn: weighted k-nearest neighbours; linear: a linear classifier on the frozen backbone " +
        "(eval_linear.py); semisup: the whole network fine-tuned on a label subset (eval_semisup.py)",
    ),
    Flag.withDefault("knn" as const),
  ),
  protocol: Flag.Literals("protocol", ["paper", "features"]).pipe(
    Flag.withDescription(
      "linear: paper (RandomResizedCrop + flip every epoch through the frozen backbone, the published " +
        "numbers' protocol; default for image folders) or features (fast probe on precomputed centre-crop " +
        "features; default for IDX/CIFAR)",
    ),
    Flag.optional,
  ),
  pooling: Flag.Literals("pooling", ["global", "avgpool"]).pipe(
    Flag.withDescription(
      "linear --protocol paper: RegLog's global average pooling (default) or AvgPool2d to 2x2 (6x6 on ResNet-50's 7x7)",
    ),
    Flag.optional,
  ),
  bn: Flag.Boolean("bn").pipe(
    Flag.withDescription("linear --pooling avgpool: BatchNorm before the linear layer (RegLog's use_bn)"),
    Flag.withDefault(false),
  ),
  labels: Flag.String("labels").pipe(
    Flag.withDescription(
      "semisup: 1% or 10% of each class (seeded), or a file of image names, one a line (SimCLR's subset files)",
    ),
    Flag.optional,
  ),
  lrHead: Flag.Finite("lr-head").pipe(
    Flag.withDescription(
      "semisup: the last layer's learning rate (default 0.2; --lr is the trunk's, default 0.01)",
    ),
    Flag.optional,
  ),
  resize: resizeFlag,
  seed: Flag.Int("seed").pipe(
    Flag.withDescription(
      "linear / semisup: seed of the classifier init, shuffles, crops and label subset (default 31)",
    ),
    Flag.optional,
  ),
  k: Flag.Int("k").pipe(
    Flag.withDescription("kNN neighbours (default: the run's train.knnK, 200)"),
    Flag.optional,
  ),
  temperature: Flag.Finite("temperature").pipe(
    Flag.withDescription("kNN vote weight exp(sim / temperature) (default 0.1)"),
    Flag.optional,
  ),
  epochs: Flag.Int("epochs").pipe(
    Flag.withDescription("linear / semisup epochs (default 100 / 20)"),
    Flag.optional,
  ),
  lr: Flag.Finite("lr").pipe(
    Flag.withDescription("linear learning rate (default 0.3); semisup: the trunk's (default 0.01)"),
    Flag.optional,
  ),
  probeBatchSize: Flag.Int("probe-batch-size").pipe(
    Flag.withDescription("linear / semisup training batch (default 256)"),
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
    const misplaced = misplacedFlag(flags);
    if (misplaced !== undefined) return yield* new EvalFlagError({ message: misplaced });
    const resize = yield* resizeOf(flags.resize);
    const progress = progressPrinter();
    const result = yield* evaluate({
      checkpoint: flags.checkpoint,
      method: flags.method,
      protocol: Option.getOrUndefined(flags.protocol),
      pooling: Option.getOrUndefined(flags.pooling),
      batchNorm: flags.bn,
      labels: Option.getOrUndefined(flags.labels),
      lrHead: Option.getOrUndefined(flags.lrHead),
      resize,
      seed: Option.getOrUndefined(flags.seed),
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
    console.log(summaryLines(result).join("\n"));
  }))).pipe(
    Command.withDescription(
      "Evaluate a checkpoint: kNN, linear evaluation (paper protocol or fast probe) or semi-supervised fine-tuning",
    ),
  );

/** What `eval` prints without `--json`. */
const summaryLines = (result: Evaluation): string[] => {
  const resize = result.resize === undefined ? "no resize" : `resize ${result.resize}`;
  const what = result.method === "knn"
    ? `kNN (k ${result.k}, temperature ${result.temperature}, ${resize})`
    : result.method === "semisup"
    ? `semi-supervised fine-tuning on ${result.subsetSamples} labelled images (${result.labels}, ${resize})`
    : result.protocol === "paper"
    ? `linear evaluation, paper protocol (${result.pooling} pooling${
      result.batchNorm ? " + BN" : ""
    }, ${resize})`
    : `linear probe on precomputed features (${resize})`;
  return [
    `${what} on ${result.trainSamples} train / ${result.testSamples} test samples, ${result.checkpoint}`,
    result.method === "knn"
      ? `top-1 ${percent(result.top1)}  top-5 ${percent(result.top5)}`
      : `best top-1 ${percent(result.top1)} (epoch ${result.bestEpoch}/${result.epochs}), top-5 ${
        percent(result.top5)
      }; last top-1 ${percent(result.lastTop1)}, top-5 ${percent(result.lastTop5)}`,
    "per class: " + result.classes.map((c, i) => `${c} ${percent(result.perClassAccuracy[i]!)}`).join(", "),
  ];
};

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
  resize: resizeFlag,
  backend: backendFlag,
}, (flags) =>
  reportFailure(Effect.gen(function* () {
    const resize = yield* resizeOf(flags.resize);
    const progress = progressPrinter();
    const sidecar = yield* extractToFolder({
      resize,
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
