/**
 * ResNet backbones (18/34 with basic blocks, 50 with bottleneck blocks) as in
 * torchvision and SwAV's `src/resnet50.py`, written as pure functions over named
 * parameters so that checkpoints and the optimiser can iterate over a flat list.
 *
 * Layouts: activations NHWC, conv filters [kh, kw, in, out] (TF.js), names as in
 * torch's `state_dict` with a `backbone.` prefix (`backbone.layer1.0.conv1.weight`).
 * BatchNorm running statistics are non-trainable parameters
 * (`...running_mean`, `...running_var`); torch's `num_batches_tracked` is not kept
 * (it only matters for momentum=None).
 */
import * as tf from "@tensorflow/tfjs";
import { batchNormTrain } from "../backend/batch_norm.ts";
import { addRelu } from "../backend/elementwise_kernels.ts";
import { bf16Trunk, bf16TrunkActive, bf16TrunkSupports } from "../backend/bf16_trunk.ts";
import { kernelInvariant } from "../backend/invariant.ts";
import { type BackbonePlan, type BlockPlan, BN_EPS, BN_MOMENTUM } from "./resnet_plan.ts";
import { type BlocksProgram, blocksProgram } from "./resnet_trunk.ts";

export {
  type BackboneConfig,
  type BackbonePlan,
  backbonePlan,
  type BlockPlan,
  BN_EPS,
  BN_MOMENTUM,
  convOutSize,
  type ResnetArch,
  type ResnetStem,
} from "./resnet_plan.ts";
export { type BlocksProgram, blocksProgram } from "./resnet_trunk.ts";

/** How a parameter is initialised (torchvision / PyTorch defaults). */
export type ParamInit =
  | { readonly kind: "kaimingNormalFanOut"; readonly fanOut: number } // conv: N(0, 2/fan_out)
  | { readonly kind: "uniformFanIn"; readonly fanIn: number } // nn.Linear weight and bias: U(±1/√fan_in)
  | { readonly kind: "ones" }
  | { readonly kind: "zeros" };

/** One named parameter: shape, initialisation and whether the optimiser updates it. */
export interface ParamSpec {
  readonly name: string;
  readonly shape: readonly number[];
  readonly init: ParamInit;
  /** False for BatchNorm running statistics. */
  readonly trainable: boolean;
}

/** Reads a parameter by name (a model's variables, or any tensors in the same layout). */
export type ParamLookup = (name: string) => tf.Tensor;

const convSpec = (name: string, kernel: number, inC: number, outC: number): ParamSpec => ({
  name,
  shape: [kernel, kernel, inC, outC],
  init: { kind: "kaimingNormalFanOut", fanOut: outC * kernel * kernel },
  trainable: true,
});

/** BatchNorm parameters in torch's state_dict order: weight, bias, running_mean, running_var. */
export const batchNormSpecs = (name: string, channels: number): ParamSpec[] => [
  { name: `${name}.weight`, shape: [channels], init: { kind: "ones" }, trainable: true },
  { name: `${name}.bias`, shape: [channels], init: { kind: "zeros" }, trainable: true },
  { name: `${name}.running_mean`, shape: [channels], init: { kind: "zeros" }, trainable: false },
  { name: `${name}.running_var`, shape: [channels], init: { kind: "ones" }, trainable: false },
];

/** The backbone's parameters in torch's `state_dict` order. */
export const backboneParamSpecs = (plan: BackbonePlan): ParamSpec[] => {
  const { width, inputChannels } = plan.config;
  const specs: ParamSpec[] = [
    convSpec("backbone.conv1.weight", plan.stemKernel, inputChannels, width),
    ...batchNormSpecs("backbone.bn1", width),
  ];
  for (const block of plan.blocks) {
    const p = block.prefix;
    if (block.kind === "basic") {
      specs.push(convSpec(`${p}.conv1.weight`, 3, block.inChannels, block.planes));
      specs.push(...batchNormSpecs(`${p}.bn1`, block.planes));
      specs.push(convSpec(`${p}.conv2.weight`, 3, block.planes, block.outChannels));
      specs.push(...batchNormSpecs(`${p}.bn2`, block.outChannels));
    } else {
      specs.push(convSpec(`${p}.conv1.weight`, 1, block.inChannels, block.planes));
      specs.push(...batchNormSpecs(`${p}.bn1`, block.planes));
      specs.push(convSpec(`${p}.conv2.weight`, 3, block.planes, block.planes));
      specs.push(...batchNormSpecs(`${p}.bn2`, block.planes));
      specs.push(convSpec(`${p}.conv3.weight`, 1, block.planes, block.outChannels));
      specs.push(...batchNormSpecs(`${p}.bn3`, block.outChannels));
    }
    if (block.downsample) {
      specs.push(convSpec(`${p}.downsample.0.weight`, 1, block.inChannels, block.outChannels));
      specs.push(...batchNormSpecs(`${p}.downsample.1`, block.outChannels));
    }
  }
  return specs;
};

/** Training or evaluation behaviour of BatchNorm. */
export interface ForwardOptions {
  /** Train mode normalises with batch statistics (gradients flow through them); eval mode with running ones. */
  readonly training: boolean;
  /**
   * Whether train mode also updates the running statistics (default: same as
   * `training`). The update is assigned to the non-trainable variables; it is
   * not on any path to a loss, so it is inert under `tf.variableGrads`.
   */
  readonly updateRunningStats?: boolean;
}

/**
 * BatchNorm over all axes but the last (NHWC conv outputs, or [N, C] for
 * BatchNorm1d), followed by a ReLU when `relu` is true (fused in train mode, which
 * halves the tensors the gradient tape holds), with torch's semantics: in train mode normalise with the biased
 * batch variance and update the running variance with the unbiased one.
 */
export const batchNorm = <T extends tf.Tensor>(
  params: ParamLookup,
  name: string,
  x: T,
  options: ForwardOptions,
  relu = false,
): T => {
  // tf.batchNorm's gradient needs explicit offset and scale.
  const scale = params(`${name}.weight`) as tf.Tensor1D;
  const offset = params(`${name}.bias`) as tf.Tensor1D;
  if (!options.training) {
    const mean = params(`${name}.running_mean`) as tf.Tensor1D;
    const variance = params(`${name}.running_var`) as tf.Tensor1D;
    const y = tf.batchNorm(x, mean, variance, offset, scale, BN_EPS) as T;
    return relu ? tf.relu(y) : y;
  }
  const count = x.size / x.shape[x.rank - 1]!;
  // Inside the synchronous forward pass (tf.tidy, the gradient tape), where no Effect runs; torch
  // raises the same. The encode stage and the pretrain config check batch sizes before this.
  kernelInvariant(
    count >= 2,
    () =>
      `${name}: BatchNorm in train mode needs more than one value per channel (got input shape [${x.shape}])`,
  );
  // The closed-form backward (backend/batch_norm.ts): tf.batchNorm's gradient tiles every statistic
  // to the activation's shape, which made BatchNorm the largest cost of a wasm training step.
  // Synchronised batch norm's statistics are the global batch's: its count is every rank's values.
  const { y, mean, variance, count: statsCount } = batchNormTrain(x, scale, offset, BN_EPS, { relu });
  if (options.updateRunningStats ?? true) updateRunningStats(params, name, mean, variance, statsCount);
  return y;
};

/** running ← (1 − m)·running + m·batch, torch's convention (unbiased batch variance). */
const updateRunningStats = (
  params: ParamLookup,
  name: string,
  mean: tf.Tensor,
  variance: tf.Tensor,
  count: number,
): void => {
  const runningMean = params(`${name}.running_mean`);
  const runningVar = params(`${name}.running_var`);
  // Inside the synchronous forward pass, where no Effect runs; a lookup that hands out plain
  // tensors for statistics is a bug in the caller, not a data error.
  kernelInvariant(
    runningMean instanceof tf.Variable && runningVar instanceof tf.Variable,
    () => `${name}: running statistics must be variables to be updated in train mode`,
  );
  const [newMean, newVar] = tf.tidy(() => [
    tf.add(tf.mul(runningMean, 1 - BN_MOMENTUM), tf.mul(mean, BN_MOMENTUM)),
    tf.add(tf.mul(runningVar, 1 - BN_MOMENTUM), tf.mul(variance, (BN_MOMENTUM * count) / (count - 1))),
  ]);
  // assign shares the data and takes its own reference, so the new tensors can go.
  runningMean.assign(newMean!);
  runningVar.assign(newVar!);
  newMean!.dispose();
  newVar!.dispose();
};

/** Convolution with torch's symmetric zero padding (TF's 'same' pads asymmetrically at stride 2). */
const conv = (params: ParamLookup, name: string, x: tf.Tensor4D, stride: number, pad: number): tf.Tensor4D =>
  tf.conv2d(x, params(name) as tf.Tensor4D, stride, [[0, 0], [pad, pad], [pad, pad], [0, 0]]);

const block = (params: ParamLookup, b: BlockPlan, x: tf.Tensor4D, options: ForwardOptions): tf.Tensor4D => {
  const p = b.prefix;
  let y: tf.Tensor4D;
  if (b.kind === "basic") {
    y = batchNorm(params, `${p}.bn1`, conv(params, `${p}.conv1.weight`, x, b.stride, 1), options, true);
    y = batchNorm(params, `${p}.bn2`, conv(params, `${p}.conv2.weight`, y, 1, 1), options);
  } else {
    // torchvision v1.5 / SwAV: the stride sits on the 3x3 convolution.
    y = batchNorm(params, `${p}.bn1`, conv(params, `${p}.conv1.weight`, x, 1, 0), options, true);
    y = batchNorm(params, `${p}.bn2`, conv(params, `${p}.conv2.weight`, y, b.stride, 1), options, true);
    y = batchNorm(params, `${p}.bn3`, conv(params, `${p}.conv3.weight`, y, 1, 0), options);
  }
  const shortcut = b.downsample
    ? batchNorm(
      params,
      `${p}.downsample.1`,
      conv(params, `${p}.downsample.0.weight`, x, b.stride, 0),
      options,
    )
    : x;
  return addRelu(y, shortcut);
};

/**
 * The backbone on one batch x [N, H, W, C] (one resolution group): returns the
 * globally average-pooled features [N, featureDim]. In train mode BatchNorm uses
 * this batch's statistics and (by default) updates the running ones.
 */
export const backboneForward = (
  plan: BackbonePlan,
  params: ParamLookup,
  x: tf.Tensor4D,
  options: ForwardOptions,
): tf.Tensor2D => tf.tidy(() => tf.mean(backboneFeatureMap(plan, params, x, options), [1, 2]) as tf.Tensor2D);

/**
 * The backbone's last feature map [N, h, w, featureDim] before global pooling
 * (SwAV's `eval_mode=True` output, which the linear evaluation's pooling variant reads).
 */
export const backboneFeatureMap = (
  plan: BackbonePlan,
  params: ParamLookup,
  x: tf.Tensor4D,
  options: ForwardOptions,
): tf.Tensor4D =>
  tf.tidy(() => {
    // Inside tf.tidy (and the gradient tape), where no Effect runs; without it a wrong channel
    // count would surface as an opaque conv shape error from TF.js.
    kernelInvariant(
      x.shape[3] === plan.config.inputChannels,
      () => `backbone expects ${plan.config.inputChannels} input channels, got shape [${x.shape}]`,
    );
    // The CIFAR stem (no max-pool) joins the bf16 trunk, whose input is then the images.
    if (options.training && !plan.maxPool && bf16TrunkActive()) {
      const whole = blocksProgram(plan, x.shape, true);
      if (bf16TrunkSupports(whole.program)) return blocksInBf16(params, whole, x, options);
    }
    let y = conv(params, "backbone.conv1.weight", x, plan.stemStride, plan.stemPad);
    y = batchNorm(params, "backbone.bn1", y, options, true);
    // Numeric padding in TF.js max-pool ignores the padded cells, as torch's -inf padding does.
    if (plan.maxPool) y = tf.maxPool(y, 3, 2, 1);
    return residualBlocks(plan, params, y, options);
  });

/**
 * The residual blocks of `plan` on x (the stem's output): under bf16 in train mode as one op on bf16
 * activations where oneDNN takes them (backend/bf16_trunk.ts), layer by layer otherwise.
 */
export const residualBlocks = (
  plan: BackbonePlan,
  params: ParamLookup,
  x: tf.Tensor4D,
  options: ForwardOptions,
): tf.Tensor4D => {
  const trunk = options.training && bf16TrunkActive() ? blocksProgram(plan, x.shape) : undefined;
  if (trunk !== undefined && bf16TrunkSupports(trunk.program)) return blocksInBf16(params, trunk, x, options);
  let y = x;
  for (const b of plan.blocks) y = block(params, b, y, options);
  return y;
};

/** The residual blocks through the bf16 trunk: the same computation as `block` after `block`, activations in bf16. */
const blocksInBf16 = (
  params: ParamLookup,
  trunk: BlocksProgram,
  x: tf.Tensor4D,
  options: ForwardOptions,
): tf.Tensor4D => {
  const { y, statistics } = bf16Trunk(trunk.program, x, trunk.params.map(params));
  if (options.updateRunningStats ?? true) {
    statistics.forEach(({ mean, variance, count }, k) =>
      updateRunningStats(params, trunk.batchNorms[k]!, mean, variance, count)
    );
  }
  return y;
};
