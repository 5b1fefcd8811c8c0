/**
 * SwAV's projection head and prototypes (src/resnet50.py, `forward_head`):
 * Linear(feat, hidden) -> BatchNorm1d -> ReLU -> Linear(hidden, out), or a single
 * Linear(feat, out) when hidden is 0; then L2-normalise; then the prototypes,
 * Linear(out, K) without bias.
 *
 * Linear weights keep torch's layout [out, in] (so y = x·Wᵀ + b), which is also
 * the prototypes' [K, D] layout that `models/prototypes.ts` normalises.
 */
import * as tf from "@tensorflow/tfjs";
import { batchNorm, type ForwardOptions, type ParamLookup, type ParamSpec } from "./resnet.ts";
import { batchNormSpecs } from "./resnet.ts";
import { l2NormaliseRows, prototypeScores } from "./prototypes.ts";

export interface HeadConfig {
  /** Hidden width of the MLP; 0 means a single linear layer. */
  readonly hidden: number;
  /** Embedding size. */
  readonly out: number;
  /** Number of prototypes K, or one K per head (see `prototypeHeads`). */
  readonly prototypes: number | readonly number[];
}

export const PROTOTYPES_WEIGHT = "prototypes.weight";

/** One prototype head: its parameter name and its number of prototypes. */
export interface PrototypeHead {
  readonly name: string;
  readonly k: number;
}

/**
 * The model's prototype heads: one `prototypes.weight` for a number (SwAV), one
 * `prototypes.prototypes{h}.weight` per entry of a list (DeepCluster-v2's names), none for [].
 */
export const prototypeHeads = (
  config: { readonly prototypes: number | readonly number[] },
): PrototypeHead[] =>
  typeof config.prototypes === "number"
    ? [{ name: PROTOTYPES_WEIGHT, k: config.prototypes }]
    : config.prototypes.map((k, h) => ({ name: `prototypes.prototypes${h}.weight`, k }));

/** All prototypes over the heads (0 without prototypes). */
export const totalPrototypes = (config: { readonly prototypes: number | readonly number[] }): number =>
  prototypeHeads(config).reduce((sum, head) => sum + head.k, 0);

const linearSpecs = (name: string, inFeatures: number, outFeatures: number, bias: boolean): ParamSpec[] => {
  const init = { kind: "uniformFanIn", fanIn: inFeatures } as const;
  const weight: ParamSpec = {
    name: `${name}.weight`,
    shape: [outFeatures, inFeatures],
    init,
    trainable: true,
  };
  return bias ? [weight, { name: `${name}.bias`, shape: [outFeatures], init, trainable: true }] : [weight];
};

/** Head and prototype parameters in torch's `state_dict` order. */
export const headParamSpecs = (featureDim: number, config: HeadConfig): ParamSpec[] => [
  ...(config.hidden > 0
    ? [
      ...linearSpecs("projection_head.0", featureDim, config.hidden, true),
      ...batchNormSpecs("projection_head.1", config.hidden),
      ...linearSpecs("projection_head.3", config.hidden, config.out, true),
    ]
    : linearSpecs("projection_head", featureDim, config.out, true)),
  ...prototypeHeads(config).flatMap((head) =>
    linearSpecs(head.name.slice(0, -".weight".length), config.out, head.k, false)
  ),
];

/** x·Wᵀ (+ b) with a torch-layout weight [out, in]. */
export const linear = (params: ParamLookup, name: string, x: tf.Tensor2D, bias = true): tf.Tensor2D => {
  const y = tf.matMul(x, params(`${name}.weight`) as tf.Tensor2D, false, true) as tf.Tensor2D;
  return bias ? tf.add<tf.Tensor2D>(y, params(`${name}.bias`)) : y;
};

/** Projection head then L2 normalisation: unit-norm embeddings [N, out]. */
export const projectionForward = (
  config: HeadConfig,
  params: ParamLookup,
  features: tf.Tensor2D,
  options: ForwardOptions,
): tf.Tensor2D =>
  tf.tidy(() => {
    if (config.hidden === 0) return l2NormaliseRows(linear(params, "projection_head", features));
    const hidden = linear(params, "projection_head.0", features);
    const activated = batchNorm(params, "projection_head.1", hidden, options, true);
    return l2NormaliseRows(linear(params, "projection_head.3", activated));
  });

/**
 * The whole head: `{ embeddings, scores }`, as SwAV's `forward_head` returns; the scores only for one
 * head given as a number (SwAV's); other methods score their heads themselves.
 */
export const headForward = (
  config: HeadConfig,
  params: ParamLookup,
  features: tf.Tensor2D,
  options: ForwardOptions,
): { readonly embeddings: tf.Tensor2D; readonly scores: tf.Tensor2D | undefined } =>
  tf.tidy(() => {
    const embeddings = projectionForward(config, params, features, options);
    if (typeof config.prototypes !== "number") return { embeddings, scores: undefined };
    return { embeddings, scores: prototypeScores(embeddings, params(PROTOTYPES_WEIGHT) as tf.Tensor2D) };
  });
