/**
 * Export of a trained backbone in TF.js's weights format, and loading it back
 * as an encoder for `extractFeatures`.
 *
 * A folder with two files:
 *
 * - `model.json`: `{ format: "swav-ts-encoder", version: 1, model: <ModelConfig>,
 *   featureDim, input: { size, channels, mean, std }, layout, weightsManifest }`,
 *   where `weightsManifest` is TF.js's (`[{ paths: ["weights.bin"], weights:
 *   [{ name, shape, dtype: "float32" }] }]`), so `tf.io.loadWeights` /
 *   `tf.io.decodeWeights` read the weights as they are;
 * - `weights.bin`: the backbone's parameters as little-endian float32,
 *   concatenated in manifest order.
 *
 * Names and layouts are the checkpoint's (torch `state_dict` names with a
 * `backbone.` prefix): conv filters [kh, kw, in, out] (torch's [out, in, kh, kw]
 * transposed to (2, 3, 1, 0)), BatchNorm `weight`, `bias`, `running_mean`,
 * `running_var` [C]. The encoder is: stem conv + BN + ReLU (+ 3x3/2 max-pool for
 * the `imagenet` stem), the residual stages, global average pooling; inputs
 * NHWC, normalised with `input.mean` / `input.std`.
 */
import * as tf from "@tensorflow/tfjs";
import { Effect, Schema, type Scope } from "effect";
import { decodeModelConfig, type ModelConfig, type NamedVariable, type SwavModel } from "../models/model.ts";
import { backboneParamSpecs, backbonePlan } from "../models/resnet.ts";
import { NonNegativeInt, Positive, PositiveInt } from "../models/schema.ts";
import { readRegularFile, regularFileSize, resolveInside, type UnsafeFile } from "../data/bounded_read.ts";
import { kernelInvariant } from "../backend/invariant.ts";
import { writeFileAtomic } from "./atomic_write.ts";

export const encoderFormat = "swav-ts-encoder";
export const encoderFormatVersion = 1;

/** An export folder that cannot be written or read back. */
export class EncoderError extends Schema.TaggedError<EncoderError>()("EncoderError", {
  path: Schema.String,
  reason: Schema.String,
}) {
  /** The folder and the reason, on one line. */
  override get message(): string {
    return `encoder ${this.path}: ${this.reason}`;
  }
}

/** What the encoder expects as input (the run's evaluation transform). */
export interface EncoderInput {
  /** Side of the square input the backbone was evaluated at. */
  readonly size: number;
  /** Input channels: 1 (grey) or 3 (RGB). */
  readonly channels: 1 | 3;
  /** Per-channel mean subtracted after scaling pixels to [0, 1]. */
  readonly mean: readonly number[];
  /** Per-channel standard deviation divided by. */
  readonly std: readonly number[];
}

interface WeightEntry {
  readonly name: string;
  readonly shape: number[];
  readonly dtype: "float32";
}

/** The content of `model.json`. */
export interface EncoderManifest {
  readonly format: typeof encoderFormat;
  readonly version: number;
  readonly model: ModelConfig;
  readonly featureDim: number;
  readonly input: EncoderInput;
  readonly layout: string;
  readonly weightsManifest: { paths: string[]; weights: WeightEntry[] }[];
}

const isBackbone = (name: string) => name.startsWith("backbone.");

/**
 * Writes the model's backbone to `folder` (`model.json` + `weights.bin`); returns the folder.
 *
 * @example Export a (tiny, untrained) backbone and load it back for feature extraction
 * ```ts
 * import { Effect, Schema } from "effect";
 * import assert from "node:assert/strict";
 * import { exportEncoder, initBackend, loadEncoder, makeSwavModel, ModelConfig } from "@swav/swav-ts";
 *
 * await initBackend("cpu");
 * const folder = await Deno.makeTempDir();
 * {
 *   using model = makeSwavModel(Schema.decodeUnknownSync(ModelConfig)({ arch: "resnet18", width: 8, prototypes: 10 }));
 *   await Effect.runPromise(exportEncoder(model, folder, { size: 32, mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25] }));
 * }
 * const input = await Effect.runPromise(Effect.scoped(Effect.gen(function* () {
 *   const loaded = yield* loadEncoder(folder); // backbone weights only; disposed with the scope
 *   return loaded.input;
 * })));
 * assert.equal(input.size, 32);
 * assert.equal(input.channels, 3);
 * await Deno.remove(folder, { recursive: true });
 * ```
 */
export const exportEncoder = (
  model: SwavModel,
  folder: string,
  input: Omit<EncoderInput, "channels">,
): Effect.Effect<string, EncoderError> =>
  Effect.tryPromise({
    try: async () => {
      const params = model.params.filter((p) => isBackbone(p.name));
      const chunks: Float32Array[] = [];
      for (const p of params) chunks.push((await p.variable.data()) as Float32Array);
      const bytes = new Uint8Array(chunks.reduce((n, c) => n + c.byteLength, 0));
      let offset = 0;
      for (const c of chunks) {
        bytes.set(new Uint8Array(c.buffer, c.byteOffset, c.byteLength), offset);
        offset += c.byteLength;
      }
      const manifest: EncoderManifest = {
        format: encoderFormat,
        version: encoderFormatVersion,
        model: model.config,
        featureDim: model.plan.featureDim,
        input: { ...input, channels: model.config.inputChannels },
        layout: "NHWC activations; conv filters [kh, kw, in, out]; BatchNorm weight, bias, running_mean, " +
          "running_var [C] (eps 1e-5); names as torch state_dict with a backbone. prefix; " +
          "output: global average pool of the last stage [N, featureDim]",
        weightsManifest: [{
          paths: ["weights.bin"],
          weights: params.map((p) => ({ name: p.name, shape: [...p.variable.shape], dtype: "float32" })),
        }],
      };
      await Deno.mkdir(folder, { recursive: true });
      // Each file whole or not at all, never written through a symlink (pipelines/atomic_write.ts).
      await writeFileAtomic(`${folder}/weights.bin`, bytes);
      await writeFileAtomic(
        `${folder}/model.json`,
        new TextEncoder().encode(JSON.stringify(manifest, null, 2) + "\n"),
      );
      return folder;
    },
    catch: (error) =>
      new EncoderError({ path: folder, reason: error instanceof Error ? error.message : String(error) }),
  });

/** The largest `model.json` read, and the largest weights total (the 4 GiB wasm heap holds no more). */
export const maxManifestBytes = 16 * 2 ** 20;
export const maxWeightsBytes = 4 * 2 ** 30;

/** `model.json` past its format and version check; `model` is decoded by the model's own schema. */
const ManifestSchema = Schema.Struct({
  model: Schema.Unknown,
  featureDim: PositiveInt,
  input: Schema.Struct({
    size: PositiveInt.check(Schema.isLessThanOrEqualTo(4096)),
    channels: Schema.Literals([1, 3]),
    mean: Schema.Array(Schema.Finite),
    std: Schema.Array(Positive),
  }),
  layout: Schema.String,
  weightsManifest: Schema.Array(Schema.Struct({
    paths: Schema.Array(Schema.String).check(Schema.isNonEmpty()),
    weights: Schema.Array(Schema.Struct({
      name: Schema.String,
      shape: Schema.Array(NonNegativeInt),
      dtype: Schema.Literal("float32"),
    })),
  })).check(Schema.isNonEmpty()),
});

/** Reads and checks `folder/model.json` (a regular file of at most `maxManifestBytes`). */
export const readEncoderManifest = (folder: string): Effect.Effect<EncoderManifest, EncoderError> =>
  Effect.gen(function* () {
    const fail = (reason: string) => Effect.fail(new EncoderError({ path: folder, reason }));
    const path = yield* resolveInside(folder, "model.json").pipe(
      Effect.mapError((error) =>
        new EncoderError({
          path: folder,
          reason: error.reason === "no such file"
            ? "no model.json in the folder"
            : `model.json: ${error.reason}`,
        })
      ),
    );
    const bytes = yield* readRegularFile(path, maxManifestBytes).pipe(
      Effect.mapError((error) => new EncoderError({ path: folder, reason: `model.json: ${error.reason}` })),
    );
    let raw: { format?: unknown; version?: unknown };
    try {
      raw = JSON.parse(new TextDecoder().decode(bytes));
    } catch (error) {
      return yield* fail(`model.json is not valid JSON: ${(error as Error).message}`);
    }
    if (typeof raw !== "object" || raw === null || raw.format !== encoderFormat) {
      return yield* fail(`model.json is not a ${encoderFormat} export`);
    }
    if (raw.version !== encoderFormatVersion) {
      return yield* fail(
        `format version ${raw.version} is not supported (this build reads ${encoderFormatVersion})`,
      );
    }
    const checked = yield* Schema.decodeUnknownEffect(ManifestSchema)(raw, { errors: "all" }).pipe(
      Effect.mapError((error) => new EncoderError({ path: folder, reason: `model.json: ${error.message}` })),
    );
    const model = yield* decodeModelConfig(checked.model).pipe(
      Effect.mapError((error) =>
        new EncoderError({ path: folder, reason: `model config: ${error.message}` })
      ),
    );
    const { input } = checked;
    if (
      input.channels !== model.inputChannels || input.mean.length !== input.channels ||
      input.std.length !== input.channels
    ) {
      return yield* fail(
        `model.json: input has ${input.channels} channels, mean ${input.mean.length} and std ${input.std.length} ` +
          `values, the model ${model.inputChannels} channels`,
      );
    }
    return {
      format: encoderFormat,
      version: encoderFormatVersion,
      model,
      featureDim: checked.featureDim,
      input: { ...input, mean: [...input.mean], std: [...input.std] },
      layout: checked.layout,
      weightsManifest: checked.weightsManifest.map((group) => ({
        paths: [...group.paths],
        weights: group.weights.map((w) => ({ name: w.name, shape: [...w.shape], dtype: w.dtype })),
      })),
    };
  });

/**
 * Loads an exported backbone as a model whose parameters are the backbone's
 * only (the head's names are absent): enough for `extractFeatures`. Every
 * parameter of the architecture must be present with its shape. Weight files
 * are resolved inside the folder and their sizes checked against the manifest
 * (and `maxWeightsBytes`) before anything is read. The scope disposes the
 * variables.
 */
export const loadEncoder = (
  folder: string,
): Effect.Effect<{ model: SwavModel; input: EncoderInput }, EncoderError, Scope.Scope> =>
  Effect.gen(function* () {
    const manifest = yield* readEncoderManifest(folder);
    const fail = (reason: string) => new EncoderError({ path: folder, reason });
    const unsafe = (error: UnsafeFile) => fail(`cannot read weights: ${error.message}`);
    const byName = new Map<string, { shape: number[]; values: Float32Array }>();
    let total = 0;
    for (const group of manifest.weightsManifest) {
      const expected = group.weights.reduce((n, entry) => n + 4 * entry.shape.reduce((a, b) => a * b, 1), 0);
      total += expected;
      if (!Number.isSafeInteger(expected) || total > maxWeightsBytes) {
        return yield* Effect.fail(
          fail(`the manifest declares more than ${maxWeightsBytes / 2 ** 30} GiB of weights`),
        );
      }
      const files: string[] = [];
      let size = 0;
      for (const relative of group.paths) {
        const file = yield* Effect.mapError(resolveInside(folder, relative), unsafe);
        size += yield* Effect.mapError(regularFileSize(file, maxWeightsBytes), unsafe);
        files.push(file);
      }
      if (size < expected) {
        return yield* Effect.fail(
          fail(`weights file too short: ${size} bytes, the manifest needs ${expected}`),
        );
      }
      if (size > expected) {
        return yield* Effect.fail(fail(`weights file has ${size - expected} bytes past the manifest`));
      }
      const buffers: Uint8Array[] = [];
      for (const file of files) {
        buffers.push(yield* Effect.mapError(readRegularFile(file, maxWeightsBytes), unsafe));
      }
      const bytes = buffers.length === 1 ? buffers[0]! : concatBytes(buffers);
      if (bytes.length !== expected) {
        return yield* Effect.fail(fail("a weights file changed while it was read"));
      }
      let offset = 0;
      for (const entry of group.weights) {
        const count = entry.shape.reduce((a, b) => a * b, 1);
        // slice: an aligned copy independent of the file buffer.
        byName.set(entry.name, {
          shape: entry.shape,
          values: new Float32Array(bytes.slice(offset, offset + count * 4).buffer),
        });
        offset += count * 4;
      }
    }
    const plan = backbonePlan(manifest.model);
    const specs = backboneParamSpecs(plan);
    for (const spec of specs) {
      const array = byName.get(spec.name);
      if (array === undefined) {
        return yield* Effect.fail(
          fail(`lacks ${spec.name} of a ${manifest.model.arch}: another architecture?`),
        );
      }
      if (array.shape.join("x") !== spec.shape.join("x")) {
        return yield* Effect.fail(
          fail(`${spec.name} has shape [${array.shape}], ${manifest.model.arch} needs [${spec.shape}]`),
        );
      }
    }
    const model = yield* Effect.acquireRelease(
      Effect.sync((): SwavModel => {
        const params: NamedVariable[] = specs.map((spec) => ({
          name: spec.name,
          trainable: false,
          variable: tf.tidy(() =>
            tf.variable(tf.tensor(byName.get(spec.name)!.values, [...spec.shape]), false)
          ),
        }));
        const lookup = new Map(params.map((p) => [p.name, p.variable]));
        return {
          config: manifest.model,
          plan,
          params,
          param: (name) => {
            const variable = lookup.get(name);
            // A lookup inside the synchronous forward pass, where no Effect runs; the manifest was
            // checked against the architecture's parameters when the encoder loaded.
            kernelInvariant(variable !== undefined, () => `the exported encoder has no parameter ${name}`);
            return variable;
          },
          [Symbol.dispose]: () => params.forEach((p) => p.variable.isDisposed || p.variable.dispose()),
        };
      }),
      (m) => Effect.sync(() => m.params.forEach((p) => p.variable.isDisposed || p.variable.dispose())),
    );
    return { model, input: manifest.input };
  });

const concatBytes = (parts: Uint8Array[]): Uint8Array => {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let offset = 0;
  for (const p of parts) {
    out.set(p, offset);
    offset += p.length;
  }
  return out;
};
