/**
 * The raw-pixel kNN baseline of the quality target (issue 14): weighted kNN (k 200, T 0.1, cosine) on the
 * pixels themselves, centred by the training set's mean image and L2-normalised, train split -> test split,
 * with the same `knnClassify` as `eval --method knn`. A learnt feature beats the data only above this.
 *
 *   npx deno run -A bench/raw_pixels_knn.ts [SOURCE] [--k 200] [--temperature 0.1] [--no-centre] [--json]
 *
 * SOURCE defaults to /usr/share/datasets/fashion-mnist; grey images give one value per pixel, colour ones
 * three (RGB in [0, 1]).
 */
import * as tf from "@tensorflow/tfjs";
import { Effect } from "effect";
import { reportFailure } from "../cli/report.ts";
import { initBackend } from "../backend/tensor_backend.ts";
import { type DataSource, openSource } from "../data/sources.ts";
import { knnClassify } from "../pipelines/knn.ts";
import { resolveSourceSpec } from "../pipelines/sources.ts";
import { withSplit } from "../pipelines/pretrain.ts";

const args = [...Deno.args];
const option = (name: string, fallback: number): number => {
  const i = args.indexOf(name);
  return i < 0 ? fallback : Number(args.splice(i, 2)[1]);
};
const flag = (name: string): boolean => {
  const i = args.indexOf(name);
  if (i >= 0) args.splice(i, 1);
  return i >= 0;
};
const k = option("--k", 200);
const temperature = option("--temperature", 0.1);
const centre = !flag("--no-centre");
const json = flag("--json");
const spec = args[0] ?? "/usr/share/datasets/fashion-mnist";

/** Every sample's pixels in [0, 1] as rows of one matrix (one value per pixel for grey sources). */
const pixels = (source: DataSource) =>
  Effect.gen(function* () {
    const first = (yield* source.read(0)).image;
    const grey = source.channels === 1;
    const dim = first.width * first.height * (grey ? 1 : 3);
    const rows = new Float32Array(source.length * dim);
    const labels = new Int32Array(source.length);
    for (let i = 0; i < source.length; i++) {
      const { image, label } = yield* source.read(i);
      const data = image.data;
      const row = rows.subarray(i * dim, (i + 1) * dim);
      if (grey) { for (let p = 0; p < dim; p++) row[p] = data[3 * p]! / 255; }
      else for (let p = 0; p < dim; p++) row[p] = data[p]! / 255;
      labels[i] = label;
    }
    return { rows, labels, dim };
  });

const main = Effect.gen(function* () {
  yield* Effect.promise(() => initBackend("wasm"));
  const train = yield* openSource(yield* resolveSourceSpec(withSplit(spec, "train")));
  const test = yield* openSource(yield* resolveSourceSpec(withSplit(spec, "test")));
  const start = performance.now();
  const a = yield* pixels(train);
  const b = yield* pixels(test);
  const trainX = tf.tensor2d(a.rows, [train.length, a.dim]);
  const testX = tf.tensor2d(b.rows, [test.length, b.dim]);
  // Centred by the training mean image (both splits), then knnClassify L2-normalises the rows.
  const [trainC, testC] = tf.tidy(() => {
    if (!centre) return [trainX.clone(), testX.clone()];
    const mean = trainX.mean(0, true);
    return [trainX.sub(mean) as tf.Tensor2D, testX.sub(mean) as tf.Tensor2D];
  });
  const result = yield* knnClassify(trainC, a.labels, testC, b.labels, {
    k,
    temperature,
    numClasses: train.classes?.length ?? 1 + Math.max(...a.labels),
  });
  tf.dispose([trainX, testX, trainC, testC]);
  const out = {
    source: spec,
    features: "raw pixels",
    centred: centre,
    k,
    temperature,
    train: train.length,
    test: test.length,
    top1: result.top1,
    top5: result.top5,
    seconds: (performance.now() - start) / 1000,
  };
  console.log(
    json
      ? JSON.stringify(out)
      : `raw-pixel kNN (k ${k}, T ${temperature}${centre ? ", centred" : ""}): top-1 ${
        (100 * result.top1).toFixed(2)
      }%, top-5 ${(100 * result.top5).toFixed(2)}% (${out.seconds.toFixed(0)} s)`,
  );
});

if (import.meta.main) await Effect.runPromise(reportFailure(main));
