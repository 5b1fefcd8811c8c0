/**
 * The built-in demo: pretrain SwAV on the generated shapes-and-textures data
 * set, then compare kNN accuracy of its features with the same network at its
 * random initialisation, on the same data. Needs no download.
 */
import { buildReport } from "./report_html.ts";
import { RunRecordError, writeDemoRecord } from "./run_records.ts";
import { Effect } from "effect";
import { type BackendName, TensorBackend } from "../backend/tensor_backend.ts";
import { decodeRunConfig, type RunConfigInput } from "../config/config.ts";
import { openSource } from "../data/sources.ts";
import { readCheckpoint } from "./checkpoint.ts";
import { activeKernels } from "./environment.ts";
import { knnTop1 } from "./knn.ts";
import { pretrain, type PretrainHooks, scopedModel } from "./pretrain.ts";
import { resolveSourceSpec } from "./sources.ts";
import { plural } from "./wording.ts";
import { loadModelArrays, type SwavModel, totalPrototypes } from "../models/model.ts";
import type { RunConfig } from "../config/config.ts";

/**
 * The demo's recipe, sized for a few minutes on 2 cores: a small ResNet-18 on the
 * images' luma (one channel), 2 crops of 32 px, brightness and contrast jitter.
 * Colour is random per image in this data set, so on such a short schedule it
 * is a shortcut: with RGB input the two crops of an image match by colour alone
 * and the features learn nothing about shape (measured: kNN at or below random
 * features); with colour jitter strong enough to close that shortcut, a few
 * hundred steps are not enough to leave the uniform-code state. Luma input
 * removes the shortcut, as a grey data set would.
 */
export const demoConfig: RunConfigInput = {
  data: { source: "builtin:demo", workers: 1, channels: 1 },
  multicrop: {
    nmbCrops: [2],
    sizeCrops: [32],
    minScaleCrops: [0.3],
    maxScaleCrops: [1],
    brightness: 0.4,
    contrast: 0.4,
    saturation: 0,
    hue: 0,
    grayscaleProbability: 0,
    blur: false,
    channels: 1,
  },
  model: {
    arch: "resnet18",
    width: 8,
    stem: "cifar",
    inputChannels: 1,
    hidden: 256,
    out: 64,
    prototypes: 30,
  },
  swav: { freezePrototypesIters: 31, queueLength: 0 },
  optim: { baseLr: 0.6, finalLr: 0.0006, warmupEpochs: 1 },
  train: { epochs: 10, batchSize: 64, seed: 7, out: "runs/demo", knnK: 20 },
};

export interface DemoOptions {
  readonly epochs?: number | undefined;
  readonly out?: string | undefined;
  readonly seed?: number | undefined;
  readonly backend?: BackendName | undefined;
  readonly json: boolean;
  readonly hooks?: PretrainHooks;
}

/** kNN top-1 of `model` on the demo's labelled splits. */
const knnOf = (model: SwavModel, config: RunConfig) =>
  Effect.gen(function* () {
    const train = yield* openSource(yield* resolveSourceSpec("builtin:demo:train"));
    const test = yield* openSource(yield* resolveSourceSpec("builtin:demo:test"));
    return yield* knnTop1(model, train, test, config);
  });

export const runDemo = (options: DemoOptions) =>
  Effect.gen(function* () {
    const started = performance.now();
    const config = yield* decodeRunConfig({
      ...demoConfig,
      train: {
        ...demoConfig.train,
        ...(options.epochs === undefined ? {} : { epochs: options.epochs }),
        ...(options.out === undefined ? {} : { out: options.out }),
        ...(options.seed === undefined ? {} : { seed: options.seed }),
        ...(options.backend === undefined ? {} : { backend: options.backend }),
      },
    }, "demo");
    const program = Effect.gen(function* () {
      const backend = yield* TensorBackend;
      options.hooks?.onInfo?.(
        `demo: ${
          plural(config.train.epochs, "epoch")
        } of SwAV on builtin:demo (10 classes of shapes and textures, ` +
          `2000 train / 500 test PNGs) with ${config.model.arch} width ${config.model.width} on ${
            activeKernels(backend.name)
          }`,
      );
      // The same network at its initialisation (same seed as the run), for the baseline.
      const randomTop1 = yield* Effect.scoped(
        Effect.flatMap(scopedModel(config.model, config.train.seed), (model) => knnOf(model, config)),
      );
      // A re-run of the demo moves the earlier demo run into previous-N (never deleted): the two commands
      // of the README keep working however often they are run.
      const result = yield* pretrain(config, {
        force: true,
        ...(options.hooks === undefined ? {} : { hooks: options.hooks }),
      });
      // Evaluate the trained weights from the final checkpoint.
      const swavTop1 = yield* Effect.scoped(Effect.gen(function* () {
        const model = yield* scopedModel(config.model, config.train.seed);
        if (result.checkpoint === undefined) return Number.NaN;
        const checkpoint = yield* readCheckpoint(result.checkpoint);
        yield* loadModelArrays(model, checkpoint.arrays, `checkpoint ${result.checkpoint}`);
        return yield* knnOf(model, config);
      }));
      const seconds = (performance.now() - started) / 1000;
      const report = {
        swav_knn_top1: swavTop1,
        random_init_knn_top1: randomTop1,
        epochs: result.epochs,
        seconds: Math.round(seconds * 10) / 10,
      };
      const pct = (x: number) => `${(100 * x).toFixed(1)}%`;
      console.log(
        [
          "",
          "SwAV demo report",
          `  data            builtin:demo, 10 classes, kNN (k=${config.train.knnK}, T=${config.train.knnTemperature}) on backbone features`,
          `  network         ${config.model.arch}, width ${config.model.width}, ${config.model.stem} stem; kernels ${
            activeKernels(backend.name)
          }`,
          `  training        ${plural(result.epochs, "epoch")}, ${plural(result.steps, "step")}, final loss ${
            result.lastLoss.toFixed(3)
          } (ln K = ${Math.log(totalPrototypes(config.model)).toFixed(3)})`,
          `  kNN top-1       SwAV ${pct(swavTop1)}  vs  random init ${pct(randomTop1)}  (chance 10.0%)`,
          `  time            ${report.seconds} s; run folder ${result.runFolder}`,
        ].join("\n"),
      );
      // The result beside the run's records, so that its report shows it.
      yield* writeDemoRecord(result.runFolder, {
        swav_knn_top1: swavTop1,
        random_init_knn_top1: randomTop1,
        knn_k: config.train.knnK,
        knn_temperature: config.train.knnTemperature,
        classes: 10,
        epochs: result.epochs,
        seconds: report.seconds,
      });
      // The run's report beside it (curves, retrieval, feature map); the --json line stays last.
      const reportPath = `${result.runFolder}/report.html`;
      const html = yield* buildReport(result.runFolder, { generatedAt: new Date().toISOString() });
      yield* Effect.tryPromise({
        try: () => Deno.writeTextFile(reportPath, html),
        catch: (error) =>
          new RunRecordError({ path: reportPath, message: `cannot write ${reportPath}: ${error}` }),
      });
      console.log(`  report          ${reportPath} (live while training: deno task dashboard RUN_DIR)`);
      if (options.json) console.log(JSON.stringify(report));
      return report;
    });
    return yield* program.pipe(Effect.provide(TensorBackend.layer(options.backend ?? config.train.backend)));
  });
