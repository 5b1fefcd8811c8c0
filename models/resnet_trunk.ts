/**
 * A backbone's residual blocks (and the CIFAR stem) as a bf16 trunk program (backend/bf16_trunk.ts):
 * the same layers, in the same order, as models/resnet.ts runs them one by one.
 */
import type { TrunkNode, TrunkProgram } from "../backend/bf16_trunk.ts";
import { type BackbonePlan, BN_EPS, convOutSize } from "./resnet_plan.ts";

/** The residual blocks as one bf16 trunk program, with the names of its parameters and batch norms. */
export interface BlocksProgram {
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
