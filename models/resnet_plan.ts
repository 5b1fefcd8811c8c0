/**
 * The layer structure of the ResNet backbones (18/34 with basic blocks, 50 with bottleneck blocks, as
 * in torchvision and SwAV's `src/resnet50.py`): depth, width, stem and every residual block, shared by
 * parameter creation and the forward (models/resnet.ts), the bf16 trunk's program
 * (models/resnet_trunk.ts) and memory estimates.
 */
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

/** Spatial size after a conv/pool with torch's floor rounding. */
export const convOutSize = (size: number, kernel: number, stride: number, pad: number): number =>
  Math.floor((size + 2 * pad - kernel) / stride) + 1;
