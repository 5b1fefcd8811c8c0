/**
 * The whole SwAV model: ResNet backbone, projection head, prototypes, as one
 * flat, ordered list of named variables (torch `state_dict` order and names,
 * backbone prefixed with `backbone.`).
 *
 * The forward pass follows SwAV's `ResNet.forward`: the backbone runs once per
 * resolution group (so its BatchNorm statistics are per group), the pooled
 * features of all groups are concatenated crop-major, and the head (with its
 * BatchNorm1d) runs once on all of them.
 */
import * as tf from "@tensorflow/tfjs";
import type { Tensor2D, Tensor4D, Variable } from "../backend/tensor_types.ts";
import { Effect, Schema, type Scope } from "effect";
import { rngFor } from "../data/rng.ts";
import { headForward, headParamSpecs, totalPrototypes } from "./head.ts";
export { type PrototypeHead, prototypeHeads, totalPrototypes } from "./head.ts";
import {
  backboneForward,
  backboneParamSpecs,
  type BackbonePlan,
  backbonePlan,
  convOutSize,
  type ForwardOptions,
  type ParamSpec,
} from "./resnet.ts";
import { withDefault } from "./schema.ts";
import { kernelInvariant } from "../backend/invariant.ts";

const positiveInt = Schema.Int.pipe(Schema.check(Schema.isGreaterThanOrEqualTo(1)));

/** A validated model config: the backbone, the projection head and the prototypes. */
export interface ModelConfig {
  /** The ResNet depth (default resnet50). */
  readonly arch: "resnet18" | "resnet34" | "resnet50";
  /** Channels of the first ResNet stage (64 in the standard networks). */
  readonly width: number;
  /** Input channels: 1 (grey) or 3 (RGB, default). */
  readonly inputChannels: 1 | 3;
  /** `imagenet` (default): 7x7/2 conv and a max-pool; `cifar`: 3x3/1 conv, no pool, for small images. */
  readonly stem: "imagenet" | "cifar";
  /** Hidden width of the projection MLP (default 2048); 0 = a single linear layer. */
  readonly hidden: number;
  /** Embedding size (default 128). */
  readonly out: number;
  /** Number of prototypes K (default 3000), a list of K per head (DeepCluster-v2), or [] for none (SimCLR). */
  readonly prototypes: number | readonly number[];
  /** Data-parallel runs: batch norm over the global batch (default true). */
  readonly syncBatchNorm: boolean;
}

/** The model config's schema; every field has the reference default. */
export const ModelConfig: Schema.Codec<ModelConfig, Partial<ModelConfig>> = Schema.Struct({
  arch: withDefault(Schema.Literals(["resnet18", "resnet34", "resnet50"]), "resnet50"),
  /** Channels of the first ResNet stage (64 in the standard networks). */
  width: withDefault(positiveInt, 64),
  inputChannels: withDefault(Schema.Literals([1, 3]), 3),
  stem: withDefault(Schema.Literals(["imagenet", "cifar"]), "imagenet"),
  /** Hidden width of the projection MLP; 0 = a single linear layer. */
  hidden: withDefault(Schema.Int.pipe(Schema.check(Schema.isGreaterThanOrEqualTo(0))), 2048),
  /** Embedding size. */
  out: withDefault(positiveInt, 128),
  /**
   * Number of prototypes K (one head, `prototypes.weight`), or a list of K per head (DeepCluster-v2's
   * `prototypes.prototypes{h}.weight`); an empty list: no prototypes (SimCLR).
   */
  prototypes: withDefault(Schema.Union([positiveInt, Schema.Array(positiveInt)]), 3000),
  /**
   * Data-parallel runs: batch norm over the global batch (the reference's
   * SyncBatchNorm) rather than each process's share. No effect in one process.
   */
  syncBatchNorm: withDefault(Schema.Boolean, true),
});

/** Validates a raw model config, filling defaults; the error names the bad field. */
export const decodeModelConfig = Schema.decodeUnknownEffect(ModelConfig);

/** A model parameter: its torch-style name, its variable, and whether the optimiser updates it. */
export interface NamedVariable {
  /** The torch-style name, e.g. `backbone.conv1.weight`. */
  readonly name: string;
  /** The variable holding the values. */
  readonly variable: Variable;
  /** Whether the optimiser updates it (false for BatchNorm running statistics). */
  readonly trainable: boolean;
}

/**
 * The model's variables. It owns them: `using model = makeSwavModel(...)` (or
 * `disposeModel`, or `scopedSwavModel` inside Effect) frees them all.
 */
export interface SwavModel extends Disposable {
  /** The architecture it was built from. */
  readonly config: ModelConfig;
  /** The backbone's layer structure. */
  readonly plan: BackbonePlan;
  /** Every parameter (trainable ones and BatchNorm running statistics) in state_dict order. */
  readonly params: readonly NamedVariable[];
  /** The variable called `name`; throws on an unknown name (a bug in the caller: names come from the specs). */
  readonly param: (name: string) => Variable;
}

/** The parameter specs of a model, in state_dict order. */
export const modelParamSpecs = (config: ModelConfig): ParamSpec[] => {
  const plan = backbonePlan(config);
  return [...backboneParamSpecs(plan), ...headParamSpecs(plan.featureDim, config)];
};

/** Stream tag of the initialisation RNG, so it never coincides with the data keys (seed, epoch, index). */
const INIT_STREAM = 0x1417_0001;

/**
 * Initial values of one parameter, drawn from its own generator keyed by
 * (seed, stream, parameter index): deterministic per seed and independent of
 * the other parameters' shapes.
 */
export const initialValues = (spec: ParamSpec, seed: number, index: number): Float32Array => {
  const size = spec.shape.reduce((a, b) => a * b, 1);
  const values = new Float32Array(size);
  const init = spec.init;
  switch (init.kind) {
    case "ones":
      values.fill(1);
      break;
    case "zeros":
      break;
    case "uniformFanIn": {
      const rng = rngFor(seed, INIT_STREAM, index);
      const bound = 1 / Math.sqrt(init.fanIn);
      for (let i = 0; i < size; i++) values[i] = rng.uniform(-bound, bound);
      break;
    }
    case "kaimingNormalFanOut": {
      // kaiming_normal_(mode="fan_out", nonlinearity="relu"): std = gain/√fan_out, gain = √2.
      const rng = rngFor(seed, INIT_STREAM, index);
      const std = Math.sqrt(2 / init.fanOut);
      for (let i = 0; i < size; i += 2) {
        // Box-Muller; 1 - u keeps the logarithm's argument in (0, 1].
        const radius = std * Math.sqrt(-2 * Math.log(1 - rng.next()));
        const angle = 2 * Math.PI * rng.next();
        values[i] = radius * Math.cos(angle);
        if (i + 1 < size) values[i + 1] = radius * Math.sin(angle);
      }
      break;
    }
  }
  return values;
};

/** Creates the model's variables with torchvision's initialisation, deterministic per `seed`. */
export const makeSwavModel = (config: ModelConfig, seed = 0): SwavModel => {
  const plan = backbonePlan(config);
  const specs = modelParamSpecs(config);
  const params: NamedVariable[] = [];
  try {
    specs.forEach((spec, index) => {
      // Variables keep TF.js's auto-generated (unique) names: two models can coexist.
      const variable = tf.tidy(() =>
        tf.variable(tf.tensor(initialValues(spec, seed, index), [...spec.shape]), spec.trainable)
      );
      params.push({ name: spec.name, variable, trainable: spec.trainable });
    });
  } catch (error) {
    for (const p of params) p.variable.dispose();
    // Re-raises TF.js's own failure (out of memory) after freeing what was made; nothing to type here.
    throw error;
  }
  const byName = new Map(params.map((p) => [p.name, p.variable]));
  const param = (name: string): Variable => {
    const variable = byName.get(name);
    // A lookup inside the synchronous forward pass (tf.tidy, the gradient tape), where no Effect
    // runs; the names come from the model's own specs, so an unknown one is a bug in the caller.
    kernelInvariant(variable !== undefined, () => `unknown model parameter ${name}`);
    return variable;
  };
  const dispose = () => {
    for (const p of params) if (!p.variable.isDisposed) p.variable.dispose();
  };
  return { config, plan, params, param, [Symbol.dispose]: dispose };
};

/** Disposes every variable of the model (the same as `model[Symbol.dispose]()`). */
export const disposeModel = (model: SwavModel): void => model[Symbol.dispose]();

/** A model whose variables the scope disposes (interruption included). */
export const scopedSwavModel = (
  config: ModelConfig,
  seed = 0,
): Effect.Effect<SwavModel, never, Scope.Scope> =>
  Effect.acquireRelease(
    Effect.sync(() => makeSwavModel(config, seed)),
    (model) => Effect.sync(() => model[Symbol.dispose]()),
  );

/** The variables the optimiser updates (everything but BatchNorm running statistics), in order. */
export const trainableVariables = (model: SwavModel): Variable[] =>
  model.params.filter((p) => p.trainable).map((p) => p.variable);

/** One parameter's values, row-major, with its name and shape (a checkpoint entry). */
export interface NamedArray {
  /** The parameter's name. */
  readonly name: string;
  /** Its shape. */
  readonly shape: readonly number[];
  /** Model parameters are float32; checkpoints also hold int32 arrays (counters). */
  readonly values: Float32Array | Int32Array;
}

/** Named arrays that do not fit the model: `parameter` is missing, or its shape differs. */
export class ModelWeightsError extends Schema.TaggedError<ModelWeightsError>()("ModelWeightsError", {
  /** What the arrays came from, e.g. "checkpoint runs/a/step-100.json". */
  source: Schema.String,
  parameter: Schema.String,
  /** The model's shape of the parameter. */
  expected: Schema.Array(Schema.Number),
  /** The shape of the array given, or undefined when it is missing. */
  got: Schema.optional(Schema.Array(Schema.Number)),
  /** Set when the array's value count does not match its own shape. */
  values: Schema.optional(Schema.Number),
}) {
  /** What does not fit, and the likely cause, on one line. */
  override get message(): string {
    if (this.got === undefined) {
      return `${this.source} lacks parameter ${this.parameter}: another architecture?`;
    }
    if (this.values !== undefined) {
      return `${this.source}: ${this.parameter} has ${this.values} values for shape [${this.got}]: a corrupt file?`;
    }
    return `${this.source}: ${this.parameter} has shape [${this.got}], the model [${this.expected}]: another architecture?`;
  }
}

/**
 * Every parameter's values as named arrays, in `model.params` order (state_dict
 * order). The reads are asynchronous: this works on every backend.
 */
export const readModelArrays = (model: SwavModel): Effect.Effect<NamedArray[]> =>
  Effect.forEach(model.params, (p) =>
    Effect.map(
      // A tensor read fails only if the backend itself does: a defect, not a typed error.
      Effect.promise(() => p.variable.data()),
      (values): NamedArray => ({
        name: p.name,
        shape: [...p.variable.shape],
        values: values as Float32Array,
      }),
    ));

/**
 * Loads named arrays into the model's variables. Every parameter of the model
 * must be present with its shape (arrays the model lacks are ignored); nothing
 * is assigned unless all fit. `source` names the arrays in the error.
 */
export const loadModelArrays = (
  model: SwavModel,
  arrays: readonly NamedArray[],
  source = "arrays",
): Effect.Effect<void, ModelWeightsError> =>
  Effect.suspend(() => {
    const byName = new Map(arrays.map((a) => [a.name, a]));
    for (const p of model.params) {
      const array = byName.get(p.name);
      const expected = [...p.variable.shape];
      if (array === undefined) {
        return Effect.fail(new ModelWeightsError({ source, parameter: p.name, expected }));
      }
      if (array.shape.join("x") !== expected.join("x")) {
        return Effect.fail(
          new ModelWeightsError({ source, parameter: p.name, expected, got: [...array.shape] }),
        );
      }
      if (array.values.length !== p.variable.size) {
        return Effect.fail(
          new ModelWeightsError({
            source,
            parameter: p.name,
            expected,
            got: [...array.shape],
            values: array.values.length,
          }),
        );
      }
    }
    for (const p of model.params) {
      const array = byName.get(p.name)!;
      tf.tidy(() => p.variable.assign(tf.tensor(array.values, p.variable.shape, "float32")));
    }
    return Effect.void;
  });

export interface ModelOutput {
  /** Unit-norm embeddings z [N, out], crop-major over all groups. */
  readonly embeddings: Tensor2D;
  /** Prototype scores z·Cᵀ [N, K] of a single-head model (SwAV's); undefined for other heads. */
  readonly scores: Tensor2D | undefined;
  /** Pooled backbone features [N, featureDim]. */
  readonly features: Tensor2D;
}

/**
 * The SwAV forward pass on crops grouped by resolution: each group is the
 * crop-major concatenation of the crops of one size ([crops·batch, H, W, C]).
 * The backbone runs once per group; the head runs once on all features.
 */
export const modelForward = (
  model: SwavModel,
  cropGroups: readonly Tensor4D[],
  options: ForwardOptions,
): ModelOutput =>
  tf.tidy(() => {
    // Synchronous forward inside tf.tidy and the gradient tape, where no Effect runs; the encode
    // stage only ever passes the groups of a non-empty crop list.
    kernelInvariant(cropGroups.length > 0, () => "modelForward needs at least one crop group");
    // Adjacent groups of one resolution go through the backbone together (one set of batch-norm
    // statistics), as the reference's unique_consecutive does: a config listing [2, 2] crops of one
    // size trains like [4].
    const merged = mergesGroups(cropGroups) ? groupCropsByResolution(cropGroups) : cropGroups;
    const perGroup = merged.map((group) => backboneForward(model.plan, model.param, group, options));
    const features = perGroup.length === 1 ? perGroup[0]! : tf.concat(perGroup, 0);
    const { embeddings, scores } = headForward(model.config, model.param, features, options);
    return { embeddings, scores, features };
  });

/** True when two adjacent groups have the same resolution (and would be merged). */
const mergesGroups = (groups: readonly Tensor4D[]): boolean =>
  groups.some((g, i) =>
    i > 0 && g.shape[1] === groups[i - 1]!.shape[1] && g.shape[2] === groups[i - 1]!.shape[2]
  );

/**
 * Concatenates consecutive crops of the same resolution, as SwAV's forward does
 * with `unique_consecutive`: crops [2×224, 6×96] give two groups.
 */
export const groupCropsByResolution = (crops: readonly Tensor4D[]): Tensor4D[] => {
  const groups: Tensor4D[][] = [];
  let last = "";
  for (const crop of crops) {
    const key = `${crop.shape[1]}x${crop.shape[2]}`;
    if (key !== last || groups.length === 0) groups.push([]);
    groups[groups.length - 1]!.push(crop);
    last = key;
  }
  return groups.map((group) => group.length === 1 ? group[0]!.clone() : tf.concat(group, 0));
};

/** Crop layout as in SwAV's multi-crop options: `nmbCrops[i]` crops of `sizeCrops[i]` pixels. */
export interface CropSpec {
  readonly sizeCrops: readonly number[];
  readonly nmbCrops: readonly number[];
}

/** Bytes of live tensors that a training step needs, by kind. */
export interface MemoryEstimate {
  readonly parameterCount: number;
  /** Weights, gradients, momentum and one update temporary per parameter. */
  readonly parameterBytes: number;
  /** Forward intermediates kept alive until the backward pass, and the backward's transients. */
  readonly activationBytes: number;
  /** The crops themselves. */
  readonly inputBytes: number;
  readonly totalBytes: number;
}

const FLOAT_BYTES = 4;
/**
 * Copies of each trainable parameter during a step: value, gradient, the
 * backward's partial gradients and filter transposes, momentum slot, update
 * temporary (calibrated with the activations, below).
 */
const PARAMETER_COPIES = 8;
/**
 * Full-size tensors counted per conv + BatchNorm in a training forward pass (a
 * ReLU or a residual sum adds one more); what the step really holds per unit is
 * folded into TAPE_FACTOR below, calibrated against measured peaks.
 */
const CONV_BN_TENSORS = 4;
/**
 * Ratio of a training step's peak to the forward count above. The step's
 * backward (backend/lean_gradients.ts) frees each gradient and saved activation
 * after its last use, and batch norm saves only its input (oneDNN on wasm, a
 * recomputed x̂ elsewhere), so the peak is about the forward's saved tensors
 * plus the gradients of one layer. Calibrated with `tf.profile` peaks of the
 * lean walk for ResNet-18/50 at several stems: with these constants the
 * estimate is 1.4–1.5x the measured peak, which leaves room for the wasm
 * heap's fragmentation (test/resnet_test.ts checks the ratio stays in [1, 2)).
 */
const TAPE_FACTOR = 1.2;

/**
 * Estimates the tensor memory of one training step (forward, backward,
 * optimiser update) for `batchSize` images of `crops`: the forward
 * intermediates of every layer, scaled by the measured ratio of a step's peak to
 * them (`TAPE_FACTOR`), plus parameters with their gradients and optimiser
 * slots, plus the crops. Errs on the safe side, by up to about 1.5x.
 */
export const estimateMemory = (config: ModelConfig, batchSize: number, crops: CropSpec): MemoryEstimate => {
  const plan = backbonePlan(config);
  const specs = modelParamSpecs(config);
  const size = (spec: ParamSpec) => spec.shape.reduce((a, b) => a * b, 1);
  const parameterCount = specs.filter((s) => s.trainable).reduce((sum, s) => sum + size(s), 0);
  const statCount = specs.filter((s) => !s.trainable).reduce((sum, s) => sum + size(s), 0);
  let activations = 0;
  let inputs = 0;
  let totalCrops = 0;
  crops.sizeCrops.forEach((cropSize, i) => {
    const n = batchSize * (crops.nmbCrops[i] ?? 0);
    if (n === 0) return;
    totalCrops += n;
    inputs += n * cropSize * cropSize * config.inputChannels;
    const add = (elements: number, copies: number) => {
      activations += elements * copies;
    };
    let side = convOutSize(cropSize, plan.stemKernel, plan.stemStride, plan.stemPad);
    add(n * side * side * config.width, CONV_BN_TENSORS + 1); // + ReLU
    if (plan.maxPool) {
      side = convOutSize(side, 3, 2, 1);
      add(n * side * side * config.width, 1);
    }
    for (const b of plan.blocks) {
      const outSide = convOutSize(side, 3, b.stride, 1);
      if (b.kind === "basic") {
        add(n * outSide * outSide * b.planes, CONV_BN_TENSORS + 1);
      } else {
        add(n * side * side * b.planes, CONV_BN_TENSORS + 1);
        add(n * outSide * outSide * b.planes, CONV_BN_TENSORS + 1);
      }
      const out = n * outSide * outSide * b.outChannels;
      add(out, CONV_BN_TENSORS + 2 + (b.downsample ? CONV_BN_TENSORS : 0)); // + residual sum and ReLU
      side = outSide;
    }
    activations += n * plan.featureDim;
  });
  // Head: linear, bias, BatchNorm1d (4), ReLU on [N, hidden]; a few [N, out]; scores and the
  // loss's softmax-sized temporaries on [N, K].
  activations += totalCrops * (config.hidden * 7 + config.out * 8 + totalPrototypes(config) * 6);
  const parameterBytes = FLOAT_BYTES * (parameterCount * PARAMETER_COPIES + statCount);
  const activationBytes = FLOAT_BYTES * TAPE_FACTOR * activations;
  const inputBytes = FLOAT_BYTES * inputs;
  return {
    parameterCount,
    parameterBytes,
    activationBytes,
    inputBytes,
    totalBytes: parameterBytes + activationBytes + inputBytes,
  };
};
