/**
 * PyTorch checkpoints as model weights: the one entry the CLI's `--checkpoint FILE.pth`
 * (eval, extract, export) and `pretrain --init FILE.pth` use.
 *
 * `loadWeightsFile` reads the container (data/torch_checkpoint.ts: nothing in it is executed)
 * and maps names, layouts and architecture (models/torch_names.ts). A file with only a
 * backbone (a torchvision ResNet, the hub model), or only part of the head (the projection head
 * or some prototype heads), gives a model whose missing head parts keep their seeded initial
 * values; `absentHead` names them, and every caller that uses a head says so (`initNote`, `export
 * --head` refuses).
 */
import { Effect, type Scope } from "effect";
import { readTorchStateDict, type TorchCheckpointError } from "../data/torch_checkpoint.ts";
import {
  loadModelArrays,
  type ModelConfig,
  type ModelWeightsError,
  prototypeHeads,
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
 * Loads `weights` into `model`: every parameter the file has; the others (the head parts in
 * `weights.absentHead`) keep the model's current values. Nothing is assigned unless all fit.
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
 * file's weights; the file must fit the config (its architecture fields are the run's). The head
 * parts the file lacks keep their seeded values: `absentHead` names them (see `initNote`).
 */
export const initFromWeightsFile = (
  model: SwavModel,
  path: string,
): Effect.Effect<InitFromWeights, TorchCheckpointError | TorchWeightsError | ModelWeightsError> =>
  Effect.gen(function* () {
    const weights = yield* loadWeightsFile(path, model.config);
    yield* assignWeights(model, weights, `PyTorch checkpoint ${path}`);
    // Every head part absent (the projection head and each prototype head) and none other: a backbone only.
    const backboneOnly = weights.absentHead.length === prototypeHeads(model.config).length + 1 &&
      weights.unusedHead.length === 0;
    const { hasHead, absentHead, unusedHead } = weights;
    return { hasHead, absentHead, unusedHead, backboneOnly };
  });

/** What `pretrain --init` took from its file: which head parts it lacked. */
export interface InitFromWeights {
  /** The file held the whole head. */
  readonly hasHead: boolean;
  /** The head parts the file lacked (they keep the run's seeded values), as words naming them. */
  readonly absentHead: readonly string[];
  /** The file's head keys the run's config has no place for (not used). */
  readonly unusedHead: readonly string[];
  /** The file held no head part at all. */
  readonly backboneOnly: boolean;
}

/**
 * The line `pretrain --init` prints: which head parts the file lacked and so start from the
 * run's seeded random values (none, some, or the whole head of a backbone-only file).
 */
export const initNote = (path: string, init: Omit<InitFromWeights, "hasHead">): string => {
  const { absentHead } = init;
  if (absentHead.length === 0) return `weights initialised from ${path}`;
  if (init.backboneOnly) {
    return `weights initialised from ${path}: the backbone only (the file has no projection head or ` +
      "prototypes); the head and prototypes start from random values (the run's seed)";
  }
  const one = absentHead.length === 1;
  const several = init.unusedHead.length > 1;
  const [fit, is] = several ? ["fit", "are"] : ["fits", "is"];
  const names = inWords(init.unusedHead);
  const unused = names === "" ? "" : `; its ${names} ${fit} no head of the run's config (model.prototypes) ` +
    `and ${is} not used`;
  return `weights initialised from ${path}, but the file lacks ${inWords(absentHead)}: ` +
    `${one ? "it starts" : "they start"} from random values (the run's seed)${unused}`;
};

/** "a", "a and b", "a, b and c". */
const inWords = (items: readonly string[]): string =>
  items.length <= 1 ? items.join("") : `${items.slice(0, -1).join(", ")} and ${items.at(-1)}`;

/**
 * The line `export --head` refuses with when the file lacks head parts (`absentHead`; undefined
 * for a file holding a backbone only, and an exported encoder folder).
 */
export const missingHeadMessage = (path: string, absentHead: readonly string[] | undefined): string =>
  `${path} ${
    absentHead === undefined
      ? "holds no projection head or prototypes (a backbone only)"
      : `lacks ${inWords(absentHead)}`
  }: --head would write random values in their place; export without --head, or from a file with the ` +
  "whole head";

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
      // A backbone-only file is said to be one (see `missingHeadMessage`); else its missing parts.
      ...(weights.arrays.every((a) => a.name.startsWith("backbone."))
        ? {}
        : { absentHead: weights.absentHead }),
    };
  });
