/**
 * The error channels of the evaluation pipelines are closed unions of tagged errors, checked two ways:
 *
 * - at compile time: `channels` (never called) assigns each exported Effect to its union, which only
 *   type-checks while the channel is that union (or narrower): an `unknown` channel, or an untyped
 *   failure added to a path, breaks `deno test`'s type check. The `*Tags` records list every tag of
 *   each union (a missing or an extra key does not compile), and `describe` switches over the tags
 *   with a `never` default.
 * - at run time: one real failure of each pipeline is a value with one of its union's tags and a
 *   one-line message (the CLI prints `error.message`).
 */
import assert from "node:assert/strict";
import { Cause, Effect, Exit, Schema, type Scope } from "effect";
import { writeDemoDataset } from "../data/demo_dataset.ts";
import { openSource } from "../data/sources.ts";
import type { DataSource } from "../data/sources.ts";
import type { RunConfig } from "../config/config.ts";
import { disposeModel, makeSwavModel, ModelConfig, type SwavModel } from "../models/model.ts";
import {
  evaluate,
  type EvaluateError,
  type EvaluateOptions,
  type Evaluation,
  extractWith,
  type LoadedEncoder,
  loadForEvaluation,
  type LoadForEvaluationError,
} from "../pipelines/evaluate.ts";
import { exportEncoder } from "../pipelines/export.ts";
import { extractFeatures, type ExtractFeaturesError, type Features } from "../pipelines/extract.ts";
import {
  exportCheckpointEncoder,
  type ExportCheckpointError,
  type ExtractSidecar,
  extractToFolder,
  type ExtractToFolderError,
} from "../pipelines/extract_folder.ts";
import {
  type ImageEvaluation,
  type ImageEvaluationError,
  linearEvalDefaults,
  linearEvaluation,
} from "../pipelines/linear_eval.ts";
import type { OnlineProbe } from "../pipelines/online_probe.ts";
import { buildReport, type BuildReportError } from "../pipelines/report_html.ts";
import { semisupDefaults, semisupEvaluation } from "../pipelines/semisup.ts";
import { useBackend } from "./_helpers.ts";

await useBackend("wasm");

// ---- compile time -------------------------------------------------------------------------------

/** Never called: each line compiles only while the Effect's error channel is (within) its union. */
export const channels = (
  model: SwavModel,
  source: DataSource,
  encoder: LoadedEncoder,
  config: RunConfig,
  probe: OnlineProbe,
) => {
  const options: EvaluateOptions = { checkpoint: "run", method: "knn" };
  const settings = {
    input: { ...encoder.input, resize: undefined },
    workers: 1,
    onError: "skip" as const,
    numClasses: 2,
  };
  const evaluated: Effect.Effect<Evaluation, EvaluateError> = evaluate(options);
  const loaded: Effect.Effect<LoadedEncoder, LoadForEvaluationError, Scope.Scope> = loadForEvaluation("run");
  const extracted: Effect.Effect<Features, ExtractFeaturesError> = extractWith(encoder, source, {});
  const features: Effect.Effect<Features, ExtractFeaturesError> = extractFeatures(model, source, {
    size: 16,
    mean: [0.5],
    std: [0.25],
  });
  const linear: Effect.Effect<ImageEvaluation, ImageEvaluationError, Scope.Scope> = linearEvaluation(
    model,
    source,
    source,
    { ...linearEvalDefaults, ...settings },
  );
  const semisup: Effect.Effect<ImageEvaluation, ImageEvaluationError, Scope.Scope> = semisupEvaluation(
    model,
    source,
    [0],
    source,
    { ...semisupDefaults, ...settings },
  );
  const folder: Effect.Effect<ExtractSidecar, ExtractToFolderError> = extractToFolder({
    checkpoint: "run",
    out: "out",
  });
  const exported: Effect.Effect<string, ExportCheckpointError> = exportCheckpointEncoder("run", "out");
  const report: Effect.Effect<string, BuildReportError> = buildReport("run");
  const top1: Effect.Effect<number, ExtractFeaturesError> = probe.top1(model, source, config);
  return [evaluated, loaded, extracted, features, linear, semisup, folder, exported, report, top1];
};

/** Every tag of each union: a tag missing here, or one that is not in the union, does not compile. */
const loadTags: Record<LoadForEvaluationError["_tag"], true> = {
  CheckpointError: true,
  EncoderError: true,
  TorchCheckpointError: true,
  TorchWeightsError: true,
  ModelWeightsError: true,
  EvaluationError: true,
};
const extractTags: Record<ExtractFeaturesError["_tag"], true> = { DecodeError: true, LoaderError: true };
const imageTags: Record<ImageEvaluationError["_tag"], true> = { ...extractTags, EvaluationInputError: true };
const evaluateTags: Record<EvaluateError["_tag"], true> = {
  ...loadTags,
  ...imageTags,
  SourceError: true,
};
const extractToFolderTags: Record<ExtractToFolderError["_tag"], true> = {
  ...loadTags,
  ...extractTags,
  SourceError: true,
};
const exportTags: Record<ExportCheckpointError["_tag"], true> = { ...loadTags, ExportError: true };
const reportTags: Record<BuildReportError["_tag"], true> = { ...loadTags, ...extractTags, SourceError: true };

/** What the CLI would say about each failure of `evaluate`: exhaustive, so a new member must be handled. */
const describe = (error: EvaluateError): string => {
  switch (error._tag) {
    case "CheckpointError":
    case "EncoderError":
    case "TorchCheckpointError":
    case "TorchWeightsError":
    case "ModelWeightsError":
      return `cannot load: ${error.message}`;
    case "SourceError":
    case "LoaderError":
    case "DecodeError":
      return `cannot read the data: ${error.message}`;
    case "EvaluationError":
    case "EvaluationInputError":
      return `cannot evaluate: ${error.message}`;
    default: {
      const unhandled: never = error;
      return unhandled;
    }
  }
};

Deno.test("error unions: the tag lists are those of the pipelines' unions", () => {
  assert.deepEqual(Object.keys(exportTags).sort(), [...Object.keys(loadTags), "ExportError"].sort());
  assert.deepEqual(Object.keys(reportTags).sort(), Object.keys(extractToFolderTags).sort());
  assert.equal(Object.keys(evaluateTags).length, 10);
});

// ---- run time -----------------------------------------------------------------------------------

/** The failure of `effect`: a value (not a defect) whose tag is in `tags` and whose message is one line. */
const typedFailure = async <E extends { readonly _tag: string; readonly message: string }>(
  effect: Effect.Effect<unknown, E>,
  tags: Record<string, true>,
): Promise<E> => {
  const exit = await Effect.runPromiseExit(effect);
  assert.ok(Exit.isFailure(exit), "should fail");
  const error = Cause.findErrorOption(exit.cause);
  assert.ok(error._tag === "Some", `a typed failure, not a defect: ${Cause.pretty(exit.cause)}`);
  const value = error.value;
  assert.ok(Object.hasOwn(tags, value._tag), `${value._tag} is not in the union`);
  assert.ok(value.message.length > 0 && !value.message.includes("\n"), `one line: ${value.message}`);
  return value;
};

const tinyModel = () =>
  makeSwavModel(Schema.decodeUnknownSync(ModelConfig)({ arch: "resnet18", width: 4, stem: "cifar" }));
const input = { size: 16, channels: 3 as const, mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25] };

/** A labelled two-class image folder whose first image is not an image. */
const corruptFolder = async (): Promise<string> => {
  const folder = await Deno.makeTempDir();
  await writeDemoDataset({ folder, perClassTrain: 1, perClassTest: 1, size: 16, seed: 1 });
  const root = `${folder}/train`;
  const first = [...Deno.readDirSync(root)].map((e) => e.name).sort()[0]!;
  const image = [...Deno.readDirSync(`${root}/${first}`)].map((e) => e.name).sort()[0]!;
  await Deno.writeTextFile(`${root}/${first}/${image}`, "this is not an image");
  return folder;
};

Deno.test("evaluate: a missing data folder fails with a SourceError of EvaluateError", async () => {
  const encoder = await Deno.makeTempDir();
  try {
    using model = tinyModel();
    await Effect.runPromise(exportEncoder(model, encoder, input));
    const error = await typedFailure(
      evaluate({
        checkpoint: encoder,
        method: "knn",
        train: `${encoder}/no-such-data:train`,
        test: `${encoder}/no-such-data:test`,
      }),
      evaluateTags,
    );
    assert.equal(error._tag, "SourceError");
    assert.match(error.message, /no-such-data/);
    assert.match(describe(error), /^cannot read the data: /);
  } finally {
    await Deno.remove(encoder, { recursive: true });
  }
});

Deno.test("linear evaluation and semisup: an image that does not decode fails with an ImageEvaluationError", async (t) => {
  const folder = await corruptFolder();
  const model = tinyModel();
  try {
    const source = await Effect.runPromise(openSource(`${folder}:train`));
    const settings = {
      input: { ...input, resize: undefined },
      workers: 1,
      onError: "fail" as const,
      numClasses: 2,
      epochs: 1,
      batchSize: 2,
    };
    await t.step("linearEvaluation", async () => {
      const error = await typedFailure(
        Effect.scoped(linearEvaluation(model, source, source, { ...linearEvalDefaults, ...settings })),
        imageTags,
      );
      assert.equal(error._tag, "DecodeError");
    });
    await t.step("semisupEvaluation", async () => {
      const error = await typedFailure(
        Effect.scoped(semisupEvaluation(model, source, [0, 1], source, { ...semisupDefaults, ...settings })),
        imageTags,
      );
      assert.equal(error._tag, "DecodeError");
    });
  } finally {
    disposeModel(model);
    await Deno.remove(folder, { recursive: true });
  }
});

Deno.test("extractToFolder and exportCheckpointEncoder: a corrupt checkpoint file fails with a tagged error of their unions", async () => {
  const folder = await Deno.makeTempDir();
  try {
    const checkpoint = `${folder}/checkpoint-000000001.swav`;
    await Deno.writeTextFile(checkpoint, "not a checkpoint");
    const extracted = await typedFailure(
      extractToFolder({ checkpoint, data: `${folder}:train`, out: `${folder}/features` }),
      extractToFolderTags,
    );
    assert.equal(extracted._tag, "CheckpointError");
    const exported = await typedFailure(exportCheckpointEncoder(checkpoint, `${folder}/encoder`), exportTags);
    assert.equal(exported._tag, "CheckpointError");
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
});
