/**
 * PyTorch names and layouts <-> ours.
 *
 * A SwAV checkpoint (main_swav.py) names the backbone as torchvision does (`conv1.weight`,
 * `layer1.0.bn1.running_mean`, ...), the head `projection_head.*` and the prototypes
 * `prototypes.weight` (DeepCluster-v2's heads `prototypes.prototypes{h}.weight`), all with
 * DistributedDataParallel's `module.` prefix; solo-learn and
 * this project's own exports put `backbone.` before the backbone's names. Here every one of
 * those is brought to our names (`backbone.` + torchvision name, head and prototypes as they
 * are) and layouts (conv [out, in, kh, kw] -> [kh, kw, in, out]; Linear and BatchNorm as
 * they are). `num_batches_tracked`, torchvision's classifier `fc.*` and unknown keys are
 * left out.
 *
 * The architecture (ResNet depth, width, input channels, stem, head sizes, prototypes) is
 * read from the shapes; fields a config gives win, and then every parameter must fit: a
 * mismatch is one line naming the first key that does not.
 */
import { Effect, Schema } from "effect";
import { decodeModelConfig, type ModelConfig, modelParamSpecs, type NamedArray } from "./model.ts";
import { backboneParamSpecs, backbonePlan } from "./resnet.ts";

/** A tensor from a PyTorch file, in torch's layout. */
export interface TorchArray {
  readonly shape: readonly number[];
  readonly values: Float32Array | Float64Array;
}

/** PyTorch weights that do not map onto our model's names and layouts, and why. */
export class TorchWeightsError extends Schema.TaggedError<TorchWeightsError>()("TorchWeightsError", {
  source: Schema.String,
  reason: Schema.String,
}) {
  /** Where the weights came from and what does not map. */
  override get message(): string {
    return `${this.source}: ${this.reason}`;
  }
}

/** Weights in our names and layouts, with the architecture they make. */
export interface MappedWeights {
  readonly config: ModelConfig;
  /** Every backbone parameter, and the head's and prototypes' when `hasHead`, in state_dict order. */
  readonly arrays: readonly NamedArray[];
  /** Whether the file held the projection head and prototypes (else only a backbone). */
  readonly hasHead: boolean;
  /** For each of our names, the file's key it came from (for messages). */
  readonly keyOf: ReadonlyMap<string, string>;
}

const BACKBONE = /^(conv1|bn1|layer[1-4])\./;

/** Our name for a file key, or undefined for keys that are not model weights. */
export const ourName = (key: string): string | undefined => {
  let name = key;
  while (name.startsWith("module.")) name = name.slice("module.".length);
  if (name.endsWith(".num_batches_tracked")) return undefined;
  if (name.startsWith("backbone.")) return BACKBONE.test(name.slice("backbone.".length)) ? name : undefined;
  if (BACKBONE.test(name)) return `backbone.${name}`;
  if (name.startsWith("projection_head.") || name === "prototypes.weight") return name;
  // DeepCluster-v2's MultiPrototypes: one Linear per head.
  if (/^prototypes\.prototypes\d+\.weight$/.test(name)) return name;
  return undefined;
};

/** torch conv [out, in, kh, kw] -> ours [kh, kw, in, out]; other ranks unchanged. */
export const fromTorchLayout = (shape: readonly number[], values: ArrayLike<number>): NamedLayout => {
  if (shape.length !== 4) return { shape: [...shape], values: Float32Array.from(values) };
  const [o, i, h, w] = shape as [number, number, number, number];
  const out = new Float32Array(o * i * h * w);
  for (let a = 0; a < o; a++) {
    for (let b = 0; b < i; b++) {
      for (let y = 0; y < h; y++) {
        for (let x = 0; x < w; x++) {
          out[((y * w + x) * i + b) * o + a] = values[((a * i + b) * h + y) * w + x]!;
        }
      }
    }
  }
  return { shape: [h, w, i, o], values: out };
};

/** Ours [kh, kw, in, out] -> torch conv [out, in, kh, kw]; other ranks unchanged. */
export const toTorchLayout = (shape: readonly number[], values: Float32Array): NamedLayout => {
  if (shape.length !== 4) return { shape: [...shape], values };
  const [h, w, i, o] = shape as [number, number, number, number];
  const out = new Float32Array(o * i * h * w);
  for (let a = 0; a < o; a++) {
    for (let b = 0; b < i; b++) {
      for (let y = 0; y < h; y++) {
        for (let x = 0; x < w; x++) {
          out[((a * i + b) * h + y) * w + x] = values[((y * w + x) * i + b) * o + a]!;
        }
      }
    }
  }
  return { shape: [o, i, h, w], values: out };
};

export interface NamedLayout {
  readonly shape: number[];
  readonly values: Float32Array;
}

/** torch's shape for one of ours: conv [kh, kw, in, out] -> [out, in, kh, kw]. */
export const torchShape = (shape: readonly number[]): number[] =>
  shape.length === 4 ? [shape[3]!, shape[2]!, shape[0]!, shape[1]!] : [...shape];

/** torch's name for one of ours: `backbone.` dropped unless `keepBackbonePrefix`. */
export const torchName = (name: string, keepBackbonePrefix = false): string =>
  !keepBackbonePrefix && name.startsWith("backbone.") ? name.slice("backbone.".length) : name;

const ARCHS: Record<string, ModelConfig["arch"]> = {
  "basic:2,2,2,2": "resnet18",
  "basic:3,4,6,3": "resnet34",
  "bottleneck:3,4,6,3": "resnet50",
};

/** The architecture the shapes describe; fields of `given` win. Returns a reason when it cannot tell. */
const inferConfig = (
  byName: ReadonlyMap<string, TorchArray>,
  given: Partial<ModelConfig>,
): { config: Record<string, unknown>; hasHead: boolean } | string => {
  const stem = byName.get("backbone.conv1.weight");
  if (stem === undefined) {
    return "no ResNet weights found (no conv1.weight, with or without module./backbone.)";
  }
  if (stem.shape.length !== 4) return `conv1.weight has shape [${stem.shape}], not a convolution`;
  const [width, inputChannels, kernel] = stem.shape as [number, number, number, number];
  const kind = byName.has("backbone.layer1.0.conv3.weight") ? "bottleneck" : "basic";
  const counts = [1, 2, 3, 4].map((s) => {
    const blocks = new Set<string>();
    for (const name of byName.keys()) {
      const m = name.match(new RegExp(`^backbone\\.layer${s}\\.(\\d+)\\.`));
      if (m) blocks.add(m[1]!);
    }
    return blocks.size;
  });
  const arch = ARCHS[`${kind}:${counts}`];
  if (arch === undefined && given.arch === undefined) {
    return `a ResNet with ${kind} blocks [${counts}] per stage: only ResNet-18/34/50 are supported`;
  }
  const config: Record<string, unknown> = {
    arch,
    width,
    inputChannels,
    stem: kernel === 7 ? "imagenet" : kernel === 3 ? "cifar" : undefined,
  };
  // DeepCluster-v2 (main_deepclusterv2.py) names its heads prototypes.prototypes0..H-1: all of them, in order.
  const heads = [...byName.keys()].filter((n) => n.startsWith("prototypes.prototypes"));
  const multi = Array.from(
    { length: heads.length },
    (_, h) => byName.get(`prototypes.prototypes${h}.weight`),
  );
  if (heads.length > 0) {
    const missing = multi.findIndex((t) => t === undefined);
    if (missing >= 0) {
      return `has ${heads.length} prototype heads but no prototypes.prototypes${missing}.weight: ` +
        "the heads must be numbered 0..H-1";
    }
    if (byName.has("prototypes.weight")) {
      return "has both prototypes.weight and prototypes.prototypes0.weight";
    }
  }
  const prototypes = byName.get("prototypes.weight") ?? multi[0];
  const first = byName.get("projection_head.0.weight");
  const last = byName.get("projection_head.3.weight");
  const single = byName.get("projection_head.weight");
  const hasHead = prototypes !== undefined &&
    (single !== undefined || (first !== undefined && last !== undefined));
  if (hasHead) {
    config.prototypes = heads.length > 0 ? multi.map((t) => t!.shape[0]) : prototypes.shape[0];
    if (single !== undefined) {
      config.hidden = 0;
      config.out = single.shape[0];
    } else {
      config.hidden = first!.shape[0];
      config.out = last!.shape[0];
    }
  }
  for (const [field, value] of Object.entries(given)) if (value !== undefined) config[field] = value;
  return { config, hasHead };
};

/**
 * Maps a PyTorch state dict (file keys -> tensors in torch layout) to our names, layouts and
 * architecture. `given` fixes fields of the architecture (a run's config); `source` names
 * the file in errors.
 */
export const mapTorchWeights = (
  tensors: ReadonlyMap<string, TorchArray>,
  source: string,
  given: Partial<ModelConfig> = {},
): Effect.Effect<MappedWeights, TorchWeightsError> =>
  Effect.gen(function* () {
    const fail = (reason: string) => Effect.fail(new TorchWeightsError({ source, reason }));
    const byName = new Map<string, TorchArray>();
    const keyOf = new Map<string, string>();
    for (const [key, tensor] of tensors) {
      const name = ourName(key);
      if (name === undefined) continue;
      if (byName.has(name)) return yield* fail(`${key} and ${keyOf.get(name)} are the same parameter`);
      byName.set(name, tensor);
      keyOf.set(name, key);
    }
    const inferred = inferConfig(byName, given);
    if (typeof inferred === "string") return yield* fail(inferred);
    const config = yield* decodeModelConfig(inferred.config).pipe(
      Effect.mapError((error) =>
        new TorchWeightsError({ source, reason: `the weights make no supported model: ${error.message}` })
      ),
    );
    const specs = inferred.hasHead ? modelParamSpecs(config) : backboneParamSpecs(backbonePlan(config));
    const arrays: NamedArray[] = [];
    for (const spec of specs) {
      const tensor = byName.get(spec.name);
      const key = keyOf.get(spec.name) ?? torchName(spec.name);
      const expected = torchShape(spec.shape);
      if (tensor === undefined) {
        return yield* fail(
          `lacks ${key} [${expected}] of a ${config.arch} (width ${config.width}): another architecture?`,
        );
      }
      if (tensor.shape.join("x") !== expected.join("x")) {
        return yield* fail(
          `${key} has shape [${tensor.shape}], a ${config.arch} (width ${config.width}) needs [${expected}]`,
        );
      }
      const mapped = fromTorchLayout(tensor.shape, tensor.values);
      arrays.push({ name: spec.name, shape: mapped.shape, values: mapped.values });
    }
    return { config, arrays, hasHead: inferred.hasHead, keyOf };
  });
