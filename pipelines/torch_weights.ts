/**
 * PyTorch checkpoints as model weights: the one entry the CLI's `--checkpoint FILE.pth`
 * (eval, extract, export) and `pretrain --init FILE.pth` use.
 *
 * `loadWeightsFile` reads the container (data/torch_checkpoint.ts: nothing in it is executed)
 * and maps names, layouts and architecture (models/torch_names.ts). A file with only a
 * backbone (a torchvision ResNet, the hub model) gives a model whose head and prototypes
 * keep their seeded initial values.
 */
import { Effect, type Scope } from "effect";
import { readTorchStateDict, type TorchCheckpointError } from "../data/torch_checkpoint.ts";
import {
  loadModelArrays,
  type ModelConfig,
  type ModelWeightsError,
  readModelArrays,
  scopedSwavModel,
  type SwavModel,
} from "../models/model.ts";
import { type MappedWeights, mapTorchWeights, TorchWeightsError } from "../models/torch_names.ts";
import { impossibleValue } from "./weight_values.ts";

export { TorchCheckpointError } from "../data/torch_checkpoint.ts";
export { TorchWeightsError } from "../models/torch_names.ts";

/** The first bytes of a `torch.save` file: a zip, or the legacy format's protocol-2 magic pickle. */
const ZIP = [0x50, 0x4b, 0x03, 0x04];
const LEGACY = [0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];

/** Whether `path` is a file written by `torch.save` (read from its first bytes; false for folders). */
export const isTorchCheckpointFile = (path: string): Effect.Effect<boolean> =>
  Effect.promise(async () => {
    try {
      // Stat first: opening a FIFO would block until a writer comes, a device may never end.
      if (!(await Deno.stat(path)).isFile) return false;
      using file = await Deno.open(path, { read: true });
      const head = new Uint8Array(LEGACY.length);
      const n = (await file.read(head)) ?? 0;
      const starts = (magic: number[]) => n >= magic.length && magic.every((v, i) => head[i] === v);
      return starts(ZIP) || starts(LEGACY);
    } catch {
      // A folder, a missing file or no permission: not a PyTorch file; the caller's own reader reports it.
      return false;
    }
  });

export interface WeightsFile extends MappedWeights {
  readonly path: string;
}

/**
 * Reads a PyTorch checkpoint as our weights. `given` fixes architecture fields (a run's model
 * config); the rest is inferred from the shapes. Fails with one line naming the file and the
 * first key that does not fit.
 */
export const loadWeightsFile = (
  path: string,
  given: Partial<ModelConfig> = {},
): Effect.Effect<WeightsFile, TorchCheckpointError | TorchWeightsError> =>
  Effect.gen(function* () {
    const state = yield* readTorchStateDict(path);
    const source = `PyTorch checkpoint ${path}`;
    const mapped = yield* mapTorchWeights(state.tensors, source, given);
    const impossible = impossibleValue(mapped.arrays, (name) => mapped.keyOf.get(name) ?? name);
    if (impossible !== undefined) {
      return yield* new TorchWeightsError({
        source,
        reason: `${impossible}: the weights are damaged; use another file`,
      });
    }
    return { ...mapped, path };
  });

/**
 * Loads `weights` into `model`: every parameter the file has; the others (a backbone-only
 * file's head and prototypes) keep the model's current values. Nothing is assigned unless all fit.
 */
export const assignWeights = (
  model: SwavModel,
  weights: MappedWeights,
  source: string,
): Effect.Effect<void, ModelWeightsError> =>
  Effect.gen(function* () {
    const given = new Set(weights.arrays.map((a) => a.name));
    const current = weights.hasHead ? [] : (yield* readModelArrays(model)).filter((a) => !given.has(a.name));
    yield* loadModelArrays(model, [...weights.arrays, ...current], source);
  });

/** A model made from a weights file's architecture and loaded with its weights; the scope disposes it. */
export const scopedModelFromWeights = (
  weights: WeightsFile,
  seed = 0,
): Effect.Effect<SwavModel, ModelWeightsError, Scope.Scope> =>
  Effect.gen(function* () {
    const model = yield* scopedSwavModel(weights.config, seed);
    yield* assignWeights(model, weights, `PyTorch checkpoint ${weights.path}`);
    return model;
  });

/**
 * `pretrain --init FILE.pth`: the run's model (already made from the run's config) takes the
 * file's weights; the file must fit the config (its architecture fields are the run's). Whether
 * the file held the head (else the head and prototypes keep their seeded values: see `initNote`).
 */
export const initFromWeightsFile = (
  model: SwavModel,
  path: string,
): Effect.Effect<
  { readonly hasHead: boolean },
  TorchCheckpointError | TorchWeightsError | ModelWeightsError
> =>
  Effect.gen(function* () {
    const weights = yield* loadWeightsFile(path, model.config);
    yield* assignWeights(model, weights, `PyTorch checkpoint ${path}`);
    return { hasHead: weights.hasHead };
  });

/** The line `pretrain --init` prints: a file without a head says that the head starts from random values. */
export const initNote = (path: string, hasHead: boolean): string =>
  hasHead
    ? `weights initialised from ${path}`
    : `weights initialised from ${path}: the backbone only (the file has no complete projection head and ` +
      "prototypes); the head and prototypes start from random values";

/** SwAV's evaluation transform for ImageNet weights (eval_linear.py): 224 px, its mean and std. */
export const torchEncoderInput = (channels: 1 | 3) => ({
  size: 224,
  channels,
  mean: channels === 3 ? [0.485, 0.456, 0.406] : [0.5],
  std: channels === 3 ? [0.228, 0.224, 0.225] : [0.25],
});

/**
 * `eval` / `extract` / `export --checkpoint FILE.pth`: the model and its input transform, in the
 * shape `loadForEvaluation` (pipelines/evaluate.ts) returns.
 */
export const loadTorchForEvaluation = (path: string) =>
  Effect.gen(function* () {
    const weights = yield* loadWeightsFile(path);
    const model = yield* scopedModelFromWeights(weights);
    return {
      model,
      input: torchEncoderInput(weights.config.inputChannels),
      config: undefined,
      path,
      step: undefined,
      hasHead: weights.hasHead,
    };
  });
