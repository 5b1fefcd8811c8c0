/**
 * The raw-pixel linear probe of the quality target (issue 14): `eval --method linear --protocol paper`'s
 * loop (RandomResizedCrop + flip each epoch, SGD lr 0.3 momentum 0.9, cosine to 0, best top-1) with the
 * pixels themselves in place of the frozen backbone, on the run's own sources, crop size, normalisation
 * and test-time resize, so that the two numbers differ only in the features.
 *
 *   npx deno run -A bench/raw_pixels_linear.ts --checkpoint RUN_DIR [--epochs 100] [--seed 31] [--json]
 */
import { Effect } from "effect";
import { reportFailure } from "../cli/report.ts";
import { initBackend } from "../backend/tensor_backend.ts";
import {
  defaultSourceSpecs,
  evalResizeSide,
  loadForEvaluation,
  openEvalSource,
  requireLabels,
} from "../pipelines/evaluate.ts";
import { linearEvalDefaults, linearEvaluationOn, rawPixelFeatures } from "../pipelines/linear_eval.ts";

const args = [...Deno.args];
const option = (name: string): string | undefined => {
  const i = args.indexOf(name);
  return i < 0 ? undefined : args.splice(i, 2)[1];
};
const checkpoint = option("--checkpoint");
const epochs = Number(option("--epochs") ?? linearEvalDefaults.epochs);
const seed = Number(option("--seed") ?? linearEvalDefaults.seed);
const json = args.includes("--json");
if (checkpoint === undefined) {
  console.error("usage: bench/raw_pixels_linear.ts --checkpoint RUN_DIR [--epochs N] [--seed N] [--json]");
  Deno.exit(2);
}

const main = Effect.scoped(Effect.gen(function* () {
  yield* Effect.promise(() => initBackend("wasm"));
  // The run's input settings and sources only: the model is not used.
  const encoder = yield* loadForEvaluation(checkpoint);
  const specs = yield* defaultSourceSpecs(encoder, {});
  const channels = encoder.model.config.inputChannels;
  const train = yield* openEvalSource(specs.train, channels);
  const test = yield* openEvalSource(specs.test, channels);
  const classes = yield* requireLabels(train, "train", specs.train);
  const input = {
    ...encoder.input,
    channels,
    resize: evalResizeSide("auto", encoder.input.size, train.kind),
  };
  const start = performance.now();
  const result = yield* linearEvaluationOn(rawPixelFeatures(input.size, channels), train, test, {
    ...linearEvalDefaults,
    epochs,
    seed,
    numClasses: classes.length,
    input,
    workers: 1,
    onError: "fail",
    onEpoch: json ? undefined : (report, total) =>
      console.error(
        `epoch ${report.epoch}/${total}: loss ${report.loss.toFixed(4)} top-1 ${
          (100 * report.top1).toFixed(2)
        }%`,
      ),
  });
  const out = {
    features: "raw pixels",
    protocol: "paper",
    source: specs.train,
    size: input.size,
    resize: input.resize,
    epochs,
    seed,
    top1: result.top1,
    top5: result.top5,
    bestEpoch: result.bestEpoch,
    lastTop1: result.lastTop1,
    seconds: (performance.now() - start) / 1000,
  };
  console.log(
    json
      ? JSON.stringify(out)
      : `raw-pixel linear probe (paper protocol, ${epochs} epochs): best top-1 ${
        (100 * result.top1).toFixed(2)
      }% (epoch ${result.bestEpoch}), last ${(100 * result.lastTop1).toFixed(2)}% (${
        out.seconds.toFixed(0)
      } s)`,
  );
}));

if (import.meta.main) await Effect.runPromise(reportFailure(main));
