/**
 * Export in safetensors (the format the Python ecosystem exchanges weights in): an 8-byte
 * little-endian header length, a JSON header `{ name: { dtype: "F32", shape, data_offsets } }`
 * (padded with spaces to 8 bytes), then the raw little-endian float32 tensors.
 *
 * Names and layouts are torch's (torchvision ResNet names, conv [out, in, kh, kw]), so that
 * `torchvision.models.resnet50()` with `fc = Identity()` loads the backbone strictly (BatchNorm
 * fills the `num_batches_tracked` it does not find). `prefix: "backbone."` keeps our prefix;
 * `head: true` adds `projection_head.*` and `prototypes.weight` (SwAV's names).
 */
import { Effect, Schema } from "effect";
import { reasonOf } from "../data/errors.ts";
import { readModelArrays, type SwavModel } from "../models/model.ts";
import { torchName, toTorchLayout } from "../models/torch_names.ts";
import { writeFileAtomic } from "./atomic_write.ts";

export class ExportError extends Schema.TaggedError<ExportError>()("ExportError", {
  path: Schema.String,
  reason: Schema.String,
}) {
  override get message(): string {
    return `export ${this.path}: ${this.reason}`;
  }
}

export interface TorchExportOptions {
  /** Include the projection head and prototypes (default: the backbone only). */
  readonly head?: boolean;
  /** Keep the `backbone.` prefix on backbone names (default: torchvision's bare names). */
  readonly backbonePrefix?: boolean;
}

/** The model's parameters in torch names and layouts, in state_dict order. */
export const torchArrays = (model: SwavModel, options: TorchExportOptions = {}) =>
  Effect.map(readModelArrays(model), (arrays) =>
    arrays
      .filter((a) => options.head || a.name.startsWith("backbone."))
      .map((a) => ({
        name: torchName(a.name, options.backbonePrefix ?? false),
        ...toTorchLayout(a.shape, a.values as Float32Array),
      })));

/** The bytes of a safetensors file holding `tensors` (float32). */
export const encodeSafetensors = (
  tensors: readonly { name: string; shape: readonly number[]; values: Float32Array }[],
  metadata: Record<string, string> = {},
): Uint8Array => {
  const header: Record<string, unknown> = { __metadata__: metadata };
  let offset = 0;
  for (const t of tensors) {
    header[t.name] = { dtype: "F32", shape: t.shape, data_offsets: [offset, offset + t.values.byteLength] };
    offset += t.values.byteLength;
  }
  let json = JSON.stringify(header);
  json += " ".repeat((8 - (json.length % 8)) % 8);
  const headerBytes = new TextEncoder().encode(json);
  const out = new Uint8Array(8 + headerBytes.length + offset);
  const view = new DataView(out.buffer);
  view.setBigUint64(0, BigInt(headerBytes.length), true);
  out.set(headerBytes, 8);
  let at = 8 + headerBytes.length;
  for (const t of tensors) {
    // Float32Array is little-endian on every platform Deno runs on (x86-64, aarch64).
    out.set(new Uint8Array(t.values.buffer, t.values.byteOffset, t.values.byteLength), at);
    at += t.values.byteLength;
  }
  return out;
};

/** Writes the model to `path` as safetensors; returns the path. */
export const exportSafetensors = (
  model: SwavModel,
  path: string,
  options: TorchExportOptions = {},
): Effect.Effect<string, ExportError> =>
  Effect.gen(function* () {
    const tensors = yield* torchArrays(model, options);
    const metadata = {
      format: "pt",
      producer: "swav-ts",
      arch: model.config.arch,
      width: String(model.config.width),
    };
    const bytes = encodeSafetensors(tensors, metadata);
    yield* Effect.tryPromise({
      try: () => writeFileAtomic(path, bytes),
      catch: (error) => new ExportError({ path, reason: reasonOf(error) }),
    });
    return path;
  });
