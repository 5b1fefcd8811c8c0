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
import {
  bf16Trunk,
  bf16TrunkActive,
  bf16TrunkSupports,
  type TrunkNode,
  type TrunkProgram,
} from "../backend/bf16_trunk.ts";
import { kernelInvariant } from "../backend/invariant.ts";

/** The ResNet depth: 18 and 34 with basic blocks, 50 with bottleneck blocks. */
export type ResnetArch = "resnet18" | "resnet34" | "resnet50";
/** The ResNet stem: ImageNet's (7x7/2 conv and a max-pool) or the CIFAR one (3x3/1 conv, no pool) for small images. */
export type ResnetStem = "imagenet" | "cifar";

/** What a backbone is built from: depth, width, input channels and stem. */
export interface BackboneConfig {
  /** The ResNet depth. */
  readonly arch: ResnetArch;
  /** Channels of the first stage (64 for the standard networks). */
  readonly width: number;
  /** Input channels: 1 (grey) or 3 (RGB). */
  readonly inputChannels: number;
  /** `imagenet`: 7x7/2 conv + 3x3/2 max-pool; `cifar`: 3x3/1 conv, no pool. */
  readonly stem: ResnetStem;
}

/** BatchNorm constants of torch's defaults. */
export const BN_EPS = 1e-5;
export const BN_MOMENTUM = 0.1;

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

interface StageShape {
  readonly blocks: number;
  readonly planes: number;
  readonly stride: number;
}

/** One residual block of the plan. */
export interface BlockPlan {
  /** The block's parameter name prefix, e.g. `backbone.layer1.0.`. */
  readonly prefix: string;
  /** Basic (two 3x3 convs) or bottleneck (1x1, 3x3, 1x1). */
  readonly kind: "basic" | "bottleneck";
  /** Channels in. */
  readonly inChannels: number;
  /** Width of the block's inner convolutions. */
  readonly planes: number;
  /** Channels out (planes times the expansion). */
  readonly outChannels: number;
  /** Stride of the block's spatial convolution. */
  readonly stride: number;
  /** 1x1 strided conv + BN on the shortcut when the shape changes. */
  readonly downsample: boolean;
}

/** The layer structure of a backbone; shared by parameter creation, forward and memory estimates. */
export interface BackbonePlan {
  /** The configuration it was planned from. */
  readonly config: BackboneConfig;
  /** Kernel side of the stem's convolution. */
  readonly stemKernel: number;
  /** Stride of the stem's convolution. */
  readonly stemStride: number;
  /** Padding of the stem's convolution. */
  readonly stemPad: number;
  /** Whether the stem ends with a 3x3/2 max-pool. */
  readonly maxPool: boolean;
  /** Every residual block, in order. */
  readonly blocks: readonly BlockPlan[];
  /** Size of the pooled feature vector: 8·width·expansion. */
  readonly featureDim: number;
}

const LAYERS: Record<
  ResnetArch,
  { readonly kind: "basic" | "bottleneck"; readonly counts: readonly number[] }
> = {
  resnet18: { kind: "basic", counts: [2, 2, 2, 2] },
  resnet34: { kind: "basic", counts: [3, 4, 6, 3] },
  resnet50: { kind: "bottleneck", counts: [3, 4, 6, 3] },
};

export const backbonePlan = (config: BackboneConfig): BackbonePlan => {
  const { kind, counts } = LAYERS[config.arch];
  const expansion = kind === "basic" ? 1 : 4;
  const stages: StageShape[] = counts.map((blocks, i) => ({
    blocks,
    planes: config.width * 2 ** i,
    stride: i === 0 ? 1 : 2,
  }));
  const blocks: BlockPlan[] = [];
  let inChannels = config.width;
  stages.forEach((stage, s) => {
    for (let b = 0; b < stage.blocks; b++) {
      const stride = b === 0 ? stage.stride : 1;
      const outChannels = stage.planes * expansion;
      blocks.push({
        prefix: `backbone.layer${s + 1}.${b}`,
        kind,
        inChannels,
        planes: stage.planes,
        outChannels,
        stride,
        downsample: stride !== 1 || inChannels !== outChannels,
      });
      inChannels = outChannels;
    }
  });
  const imagenet = config.stem === "imagenet";
  return {
    config,
    stemKernel: imagenet ? 7 : 3,
    stemStride: imagenet ? 2 : 1,
    stemPad: imagenet ? 3 : 1,
    maxPool: imagenet,
    blocks,
    featureDim: inChannels,
  };
};

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

/** The residual blocks as one bf16 trunk program, with the names of its parameters and batch norms. */
interface BlocksProgram {
  readonly program: TrunkProgram;
  /** Parameter names by the program's parameter indices. */
  readonly params: readonly string[];
  /** Batch-norm names, in the program's node order (for the running statistics). */
  readonly batchNorms: readonly string[];
}

const programs = new WeakMap<BackbonePlan, Map<string, BlocksProgram>>();

/**
 * The blocks of `plan` on an input of `shape` [N, H, W, C] as a trunk program, the stem's convolution
 * and batch norm (+ ReLU) first with `stem` (then the input is the images, which need no gradient).
 * Cached per plan, shape and stem.
 */
export const blocksProgram = (plan: BackbonePlan, shape: readonly number[], stem = false): BlocksProgram => {
  const key = `${shape.join(",")}:${stem}`;
  const cached = programs.get(plan)?.get(key);
  if (cached !== undefined) return cached;
  const buffers: [number, number, number, number][] = [[shape[0]!, shape[1]!, shape[2]!, shape[3]!]];
  const nodes: TrunkNode[] = [];
  const params: string[] = [];
  const batchNorms: string[] = [];
  const param = (name: string) => params.push(name) - 1;
  const convolution = (
    input: number,
    name: string,
    channels: number,
    kernel: number,
    stride: number,
    pad: number,
  ) => {
    const [n, h, w, ci] = buffers[input]!;
    const [oh, ow] = [convOutSize(h, kernel, stride, pad), convOutSize(w, kernel, stride, pad)];
    buffers.push([n, oh, ow, channels]);
    const output = buffers.length - 1;
    nodes.push({
      kind: "convolution",
      input,
      output,
      weight: param(name),
      shape: {
        n,
        h,
        w,
        ci,
        oh,
        ow,
        co: channels,
        kh: kernel,
        kw: kernel,
        sh: stride,
        sw: stride,
        dh: 1,
        dw: 1,
        top: pad,
        left: pad,
        bottom: pad,
        right: pad,
      },
    });
    return output;
  };
  const batchNormNode = (input: number, name: string, relu: boolean) => {
    buffers.push(buffers[input]!);
    const output = buffers.length - 1;
    batchNorms.push(name);
    nodes.push({
      kind: "batchNorm",
      input,
      output,
      gamma: param(`${name}.weight`),
      beta: param(`${name}.bias`),
      relu,
    });
    return output;
  };
  let x = 0;
  if (stem) {
    const stemConv = convolution(
      0,
      "backbone.conv1.weight",
      plan.config.width,
      plan.stemKernel,
      plan.stemStride,
      plan.stemPad,
    );
    x = batchNormNode(stemConv, "backbone.bn1", true);
  }
  for (const b of plan.blocks) {
    const p = b.prefix;
    let y: number;
    if (b.kind === "basic") {
      y = batchNormNode(convolution(x, `${p}.conv1.weight`, b.planes, 3, b.stride, 1), `${p}.bn1`, true);
      y = batchNormNode(convolution(y, `${p}.conv2.weight`, b.outChannels, 3, 1, 1), `${p}.bn2`, false);
    } else {
      y = batchNormNode(convolution(x, `${p}.conv1.weight`, b.planes, 1, 1, 0), `${p}.bn1`, true);
      y = batchNormNode(convolution(y, `${p}.conv2.weight`, b.planes, 3, b.stride, 1), `${p}.bn2`, true);
      y = batchNormNode(convolution(y, `${p}.conv3.weight`, b.outChannels, 1, 1, 0), `${p}.bn3`, false);
    }
    const shortcut = b.downsample
      ? batchNormNode(
        convolution(x, `${p}.downsample.0.weight`, b.outChannels, 1, b.stride, 0),
        `${p}.downsample.1`,
        false,
      )
      : x;
    buffers.push(buffers[y]!);
    nodes.push({ kind: "addRelu", a: y, b: shortcut, output: buffers.length - 1 });
    x = buffers.length - 1;
  }
  const made = {
    program: { buffers, nodes, output: x, epsilon: BN_EPS, inputGradient: !stem },
    params,
    batchNorms,
  };
  if (!programs.has(plan)) programs.set(plan, new Map());
  programs.get(plan)!.set(key, made);
  return made;
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

/** Spatial size after a conv/pool with torch's floor rounding. */
export const convOutSize = (size: number, kernel: number, stride: number, pad: number): number =>
  Math.floor((size + 2 * pad - kernel) / stride) + 1;
