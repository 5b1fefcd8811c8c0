/**
 * `extract` and `export` of a loaded checkpoint: pooled features of a source as NumPy files, and
 * the backbone as TF.js weights, safetensors or ONNX.
 */
import { Effect } from "effect";
import type { DecodeError } from "../data/image_codec.ts";
import type { LoaderError } from "../data/loader.ts";
import { type NpyValues, writeNpy } from "../data/npy.ts";
import type { SourceError } from "../data/sources.ts";
import type { SwavModel } from "../models/model.ts";
import {
  evalResizeSide,
  EvaluationError,
  extractWith,
  loadForEvaluation,
  type LoadForEvaluationError,
  type OnWarning,
  openEvalSource,
  type ResizeOption,
} from "./evaluate.ts";
import { exportOnnx } from "./export_onnx.ts";
import { type ExportError, exportSafetensors } from "./export_safetensors.ts";
import { type EncoderInput, exportEncoder } from "./export.ts";
import { withSplit } from "./pretrain.ts";
import { sameFile } from "./atomic_write.ts";
import { missingHeadMessage } from "./torch_weights.ts";

export interface ExtractToFolderOptions {
  readonly checkpoint: string;
  /** SOURCE spec; defaults to the run's train split. */
  readonly data?: string | undefined;
  readonly out: string;
  readonly batchSize?: number | undefined;
  readonly workers?: number | undefined;
  /** Test-time resize (default `auto`, as `evaluate`). */
  readonly resize?: ResizeOption | undefined;
  readonly onProgress?: ((done: number, total: number) => void) | undefined;
  readonly onWarning?: OnWarning;
}

/**
 * Fails unless `folder` can be created and written: checked before any work,
 * so a bad `--out` costs nothing (a probe file is written and removed).
 */
export const ensureWritableFolder = (folder: string): Effect.Effect<void, EvaluationError> =>
  Effect.tryPromise({
    try: async () => {
      await Deno.mkdir(folder, { recursive: true });
      const probe = `${folder}/.swav-write-check-${crypto.randomUUID()}`;
      await Deno.writeFile(probe, new Uint8Array(0), { createNew: true });
      await Deno.remove(probe);
    },
    catch: (error) =>
      new EvaluationError({
        message: `cannot write to ${folder}: ${
          error instanceof Error ? error.message : String(error)
        }: give --out a folder you can write`,
      }),
  });

/** What `extractToFolder` wrote (also the content of `features.json`). */
export interface ExtractSidecar {
  readonly features: string;
  readonly labels: string;
  readonly indices: string;
  readonly count: number;
  readonly dim: number;
  readonly dtype: { features: "float32"; labels: "int64"; indices: "int64" };
  readonly source: string;
  readonly split: string;
  readonly classes: readonly string[] | null;
  readonly checkpoint: string;
  readonly step: number | null;
  readonly model: SwavModel["config"];
  readonly input: EncoderInput;
  /** Shorter side of the resize before the centre crop (null: none). */
  readonly resize: number | null;
  readonly skipped: number;
}

/**
 * How `extractToFolder` fails: the checkpoint does not load (LoadForEvaluationError), the SOURCE does not
 * open (SourceError) or read (LoaderError, DecodeError), or the out folder cannot be written (EvaluationError).
 */
export type ExtractToFolderError =
  | LoadForEvaluationError
  | SourceError
  | LoaderError
  | DecodeError
  | EvaluationError;

/**
 * How `exportCheckpointEncoder` fails: the checkpoint does not load (LoadForEvaluationError), `--out` is
 * unusable or asks for what the file lacks (EvaluationError), or a weights file cannot be written (ExportError,
 * EncoderError).
 */
export type ExportCheckpointError = LoadForEvaluationError | EvaluationError | ExportError;

const toInt64 = (values: Int32Array): NpyValues => BigInt64Array.from(values, (v) => BigInt(v));

/**
 * Writes pooled features of a source to `out/features.npy` (float32 [N, D]),
 * `out/labels.npy` (int64 [N], -1 unlabelled), `out/indices.npy` (int64 [N],
 * source index of each row) and `out/features.json` (the sidecar).
 */
export const extractToFolder = (
  options: ExtractToFolderOptions,
): Effect.Effect<ExtractSidecar, ExtractToFolderError> =>
  Effect.scoped(Effect.gen(function* () {
    yield* ensureWritableFolder(options.out);
    const encoder = yield* loadForEvaluation(options.checkpoint, options.onWarning);
    const spec = options.data ??
      (encoder.config === undefined ? undefined : withSplit(encoder.config.data.source, "train"));
    if (spec === undefined) {
      return yield* new EvaluationError({
        message: `${encoder.path} is an exported encoder without a run config: give --data`,
      });
    }
    const source = yield* openEvalSource(spec, encoder.model.config.inputChannels);
    const extracted = yield* Effect.acquireRelease(
      extractWith(encoder, source, options),
      (f) => Effect.sync(() => f.features.dispose()),
    );
    const [count, dim] = extracted.features.shape;
    const values = (yield* Effect.promise(() => extracted.features.data())) as Float32Array;
    const sidecar: ExtractSidecar = {
      features: "features.npy",
      labels: "labels.npy",
      indices: "indices.npy",
      count,
      dim,
      dtype: { features: "float32", labels: "int64", indices: "int64" },
      source: spec,
      split: source.split,
      classes: source.classes ?? null,
      checkpoint: encoder.path,
      step: encoder.step ?? null,
      model: encoder.model.config,
      input: encoder.input,
      resize: evalResizeSide(options.resize ?? "auto", encoder.input.size, source.kind) ?? null,
      skipped: source.length - count,
    };
    yield* Effect.tryPromise({
      try: async () => {
        await Deno.mkdir(options.out, { recursive: true });
        await Effect.runPromise(writeNpy(`${options.out}/features.npy`, values, [count, dim]));
        await Effect.runPromise(writeNpy(`${options.out}/labels.npy`, toInt64(extracted.labels), [count]));
        await Effect.runPromise(writeNpy(`${options.out}/indices.npy`, toInt64(extracted.indices), [count]));
        await Deno.writeTextFile(`${options.out}/features.json`, JSON.stringify(sidecar, null, 2) + "\n");
      },
      catch: (error) =>
        new EvaluationError({
          message: `cannot write to ${options.out}: ${
            error instanceof Error ? error.message : String(error)
          }`,
        }),
    });
    return sidecar;
  }));

/** Exports the backbone of PATH (checkpoint or run folder) to `out` (see `pipelines/export.ts`). */
/** What `export` writes: TF.js weights (a folder), safetensors or ONNX (a file). */
export type ExportFormat = "tfjs" | "safetensors" | "onnx";

export const exportCheckpointEncoder = (
  checkpoint: string,
  out: string,
  onWarning?: OnWarning,
  options: { readonly format?: ExportFormat; readonly head?: boolean } = {},
): Effect.Effect<string, ExportCheckpointError> =>
  Effect.scoped(Effect.gen(function* () {
    const format = options.format ?? "tfjs";
    // A folder for TF.js; the file's folder otherwise. Checked before any work.
    yield* refuseOverwritingInput(checkpoint, out, format);
    yield* ensureWritableFolder(format === "tfjs" ? out : parentFolder(out));
    const encoder = yield* loadForEvaluation(checkpoint, onWarning);
    if (options.head && format !== "tfjs" && encoder.hasHead === false) {
      return yield* new EvaluationError({ message: missingHeadMessage(checkpoint, encoder.absentHead) });
    }
    if (format === "safetensors") return yield* exportSafetensors(encoder.model, out, { head: options.head });
    if (format === "onnx") return yield* exportOnnx(encoder.model, out, { head: options.head });
    return yield* exportEncoder(encoder.model, out, encoder.input);
  }));

/** `--out` naming the checkpoint it reads (or, for TF.js, the folder holding it) would overwrite it. */
const refuseOverwritingInput = (checkpoint: string, out: string, format: ExportFormat) =>
  Effect.gen(function* () {
    const targets = format === "tfjs" ? [out, `${out}/model.json`, `${out}/weights.bin`] : [out];
    for (const target of targets) {
      if (yield* Effect.promise(() => sameFile(target, checkpoint))) {
        return yield* new EvaluationError({
          message:
            `--out ${out} would overwrite the checkpoint it exports (${checkpoint}): give another --out`,
        });
      }
    }
  });

const parentFolder = (path: string): string => {
  const slash = path.lastIndexOf("/");
  return slash < 0 ? "." : slash === 0 ? "/" : path.slice(0, slash);
};
