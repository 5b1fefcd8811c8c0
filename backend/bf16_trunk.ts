/**
 * A chain of convolutions, batch norms and residual sums run as one TF.js op whose activations
 * stay bfloat16 in native memory between layers, as PyTorch's autocast keeps them: under
 * `precision: bf16` a ResNet's residual blocks (models/resnet.ts) run here instead of layer by
 * layer on fp32 TF.js tensors, where every bf16 convolution first rounds a copy of its fp32 input
 * and batch norm and the sums move fp32 data.
 *
 * The op's input and output are fp32 tensors; in between everything is bf16 on the wasm heap
 * (held as opaque float32 tensors that the gradient tape keeps for the backward): the batch-norm
 * statistics, scales and shifts stay fp32, and so do the master weights and their gradients
 * (oneDNN accumulates in fp32). The backward walks the chain in reverse on bf16 gradients and
 * sums the two gradients of a tensor used twice (a block's input) in bf16, as autocast does.
 */
import * as tf from "@tensorflow/tfjs";
import { nativeBatchNormActive } from "./batch_norm_kernels.ts";
import { nativeElementwiseActive } from "./elementwise_kernels.ts";
import { kernelInvariant } from "./invariant.ts";
import { activeKernelSettings } from "./kernel_settings.ts";
import { type BatchNormShape, type DnnlConvShape, loadDnnl } from "./onednn.ts";
import { batchNormSyncWorld } from "./sync_batch_norm.ts";
import { heapPointer, type WasmBackendLike } from "./wasm_heap.ts";

type TensorInfo = tf.TensorInfo;

/** A convolution from buffer `input` to buffer `output` with the weights `params[weight]` (HWIO). */
export interface TrunkConvolution {
  readonly kind: "convolution";
  readonly input: number;
  readonly output: number;
  readonly weight: number;
  readonly shape: DnnlConvShape;
}

/** Batch norm in training mode (batch statistics), optionally followed by ReLU. */
export interface TrunkBatchNorm {
  readonly kind: "batchNorm";
  readonly input: number;
  readonly output: number;
  readonly gamma: number;
  readonly beta: number;
  readonly relu: boolean;
}

/** max(a + b, 0) of two buffers of one shape. */
export interface TrunkAddRelu {
  readonly kind: "addRelu";
  readonly a: number;
  readonly b: number;
  readonly output: number;
}

export type TrunkNode = TrunkConvolution | TrunkBatchNorm | TrunkAddRelu;

/**
 * The chain: NHWC shapes of its buffers (buffer 0 is the op's input), the nodes in the order they
 * run (each writes a buffer no other node writes) and the buffer that is the op's output.
 */
export interface TrunkProgram {
  readonly buffers: readonly (readonly [number, number, number, number])[];
  readonly nodes: readonly TrunkNode[];
  readonly output: number;
  readonly epsilon: number;
  /**
   * Whether gradients flow to the op's input. A network's first layers take images, which need none:
   * there the input is no input of the op (asking for its gradient fails as for any constant) and its
   * first convolution's input gradient is never computed.
   */
  readonly inputGradient: boolean;
}

/** What the op returns: the output and, per batch norm in node order, its batch statistics. */
export interface TrunkOutput {
  readonly y: tf.Tensor4D;
  /** Batch mean and biased variance per channel (no gradient), and the values per channel. */
  readonly statistics: readonly {
    readonly mean: tf.Tensor1D;
    readonly variance: tf.Tensor1D;
    readonly count: number;
  }[];
}

const sizeOf = (shape: readonly number[]) => shape.reduce((a, b) => a * b, 1);

const batchNormShapeOf = (program: TrunkProgram, node: TrunkBatchNorm): BatchNormShape => {
  const [n, h, w, c] = program.buffers[node.input]!;
  return {
    rows: n * h * w,
    height: h,
    width: w,
    channels: c,
    epsilon: program.epsilon,
    relu: node.relu,
    bf16: true,
  };
};

/**
 * Whether the bf16 trunk runs now: bf16 asked for, the setting on, batch norm and the sums through
 * oneDNN, and no synchronised batch norm (whose statistics cross ranks between layers).
 */
export const bf16TrunkActive = (): boolean =>
  activeKernelSettings().precision === "bf16" && activeKernelSettings().bf16Trunk &&
  nativeBatchNormActive() &&
  nativeElementwiseActive() && batchNormSyncWorld() === undefined;

/** Whether oneDNN takes every node of `program` on bf16 activations (builds their primitives once). */
export const bf16TrunkSupports = (program: TrunkProgram): boolean => {
  const dnnl = loadDnnl();
  if (dnnl === undefined) return false;
  let answer = supported.get(program);
  if (answer === undefined) {
    answer = program.nodes.every((node) => {
      if (node.kind === "convolution") return dnnl.bf16Conv.supports(node.shape);
      if (node.kind === "batchNorm") return batchNormShapeOf(program, node).rows >= 2;
      return true;
    });
    supported.set(program, answer);
  }
  return answer;
};

/** `bf16TrunkSupports`' answers: asked before every forward, of programs models cache per shape. */
const supported = new WeakMap<TrunkProgram, boolean>();

/**
 * Which buffers the backward reads, and after which node it reads each for the last time (walking
 * backwards: the earliest node that reads it, as a convolution's or batch norm's input or a sum's
 * output). The others (a batch norm's output that only feeds a sum) are not kept past the forward.
 */
const backwardReads = (program: TrunkProgram) => {
  const lastReadAt = new Map<number, number[]>();
  const read = program.buffers.map(() => false);
  program.nodes.forEach((node, i) => {
    const b = node.kind === "addRelu" ? node.output : node.input;
    if (read[b]) return;
    read[b] = true;
    lastReadAt.set(i, [...(lastReadAt.get(i) ?? []), b]);
  });
  return { read, lastReadAt };
};

/** A heap buffer for `shape`'s values in bf16 (an opaque float32 tensor of half the count). */
const bf16Buffer = (backend: WasmBackendLike, shape: readonly number[]): TensorInfo =>
  backend.makeOutput([Math.ceil(sizeOf(shape) / 2)], "float32");

/** A bf16 gradient buffer on the heap, shared by the inputs of an addRelu until one of them changes it. */
interface Gradient {
  readonly info: TensorInfo;
  holders: number;
}

/**
 * The chain on x (fp32 [N, H, W, C], buffer 0's shape) with `params` (fp32: the convolutions'
 * HWIO weights, the batch norms' scales and shifts, referenced by index); gradients flow to every
 * parameter, and to x where `program.inputGradient`. Callers check `bf16TrunkActive()` and `bf16TrunkSupports(program)` first.
 */
export const bf16Trunk = (
  program: TrunkProgram,
  x: tf.Tensor4D,
  params: readonly tf.Tensor[],
): TrunkOutput => {
  const batchNorms = program.nodes.filter((n): n is TrunkBatchNorm => n.kind === "batchNorm");
  const shapes = batchNorms.map((node) => batchNormShapeOf(program, node));
  const statOffsets: number[] = [];
  let statFloats = 0;
  for (const shape of shapes) {
    statOffsets.push(statFloats);
    statFloats += 2 * shape.channels;
  }
  const bnIndex = new Map(batchNorms.map((node, i) => [node, i]));
  const reads = backwardReads(program);
  let kept: tf.Tensor1D | undefined;
  const inputCount = params.length + (program.inputGradient ? 1 : 0);
  const op = tf.customGrad((...args: (tf.Tensor | tf.GradSaveFunc)[]) => {
    const inputs = args.slice(0, inputCount) as tf.Tensor[];
    const save = args[inputCount] as tf.GradSaveFunc;
    const [xIn, paramsIn] = program.inputGradient ? [inputs[0]!, inputs.slice(1)] : [x, inputs];
    const backend = tf.backend() as unknown as WasmBackendLike;
    const dnnl = loadDnnl()!;
    const buffers = program.buffers.map((shape) => bf16Buffer(backend, shape));
    const workspaces = shapes.map((shape) =>
      shape.relu
        ? backend.makeOutput([Math.ceil(dnnl.batchNorm.workspaceBytes(shape) / 4)], "float32")
        : undefined
    );
    const statistics = backend.makeOutput([statFloats], "float32");
    const out = backend.makeOutput([...program.buffers[program.output]!], "float32");
    // Every allocation is done: the heap's pointers stay valid through the chain.
    const p = (info: { dataId: object; shape: readonly number[] }, byteOffset = 0) =>
      heapPointer(backend, info, byteOffset);
    dnnl.elementwise.convert(xIn.size, "f32", p(xIn), p(buffers[0]!));
    for (const node of program.nodes) {
      if (node.kind === "convolution") {
        dnnl.bf16Conv.forward(
          node.shape,
          p(buffers[node.input]!),
          p(paramsIn[node.weight]!),
          p(buffers[node.output]!),
        );
      } else if (node.kind === "batchNorm") {
        const k = bnIndex.get(node)!;
        const shape = shapes[k]!;
        dnnl.batchNorm.forward(shape, {
          x: p(buffers[node.input]!),
          gamma: p(paramsIn[node.gamma]!),
          beta: p(paramsIn[node.beta]!),
          y: p(buffers[node.output]!),
          mean: p(statistics, 4 * statOffsets[k]!),
          variance: p(statistics, 4 * (statOffsets[k]! + shape.channels)),
          workspace: workspaces[k] === undefined ? undefined : p(workspaces[k]!),
        });
      } else {
        const size = sizeOf(program.buffers[node.output]!);
        dnnl.elementwise.add(
          size,
          true,
          p(buffers[node.a]!),
          p(buffers[node.b]!),
          p(buffers[node.output]!),
          "bf16",
        );
      }
    }
    dnnl.elementwise.convert(sizeOf(out.shape), "bf16", p(buffers[program.output]!), p(out));
    const tensor = <T extends tf.Tensor>(info: TensorInfo) => tf.engine().makeTensorFromTensorInfo(info) as T;
    const { read } = reads;
    buffers.forEach((b, i) => {
      if (!read[i]) backend.disposeData(b.dataId);
    });
    const bufferTensors = buffers.flatMap((b, i) => read[i] ? [tensor(b)] : []);
    const workspaceTensors = workspaces.map((w) => w === undefined ? undefined : tensor(w));
    const statisticsTensor = tensor<tf.Tensor1D>(statistics);
    kept = tf.keep(statisticsTensor);
    save([
      ...paramsIn,
      statisticsTensor,
      ...bufferTensors,
      ...workspaceTensors.filter((w): w is tf.Tensor => w !== undefined),
    ]);
    return {
      value: tensor<tf.Tensor4D>(out),
      gradFunc: (dy: tf.Tensor | tf.Tensor[], saved: tf.Tensor[]) =>
        backward(program, dy as tf.Tensor, saved, {
          shapes,
          statOffsets,
          bnIndex,
          reads,
          paramCount: params.length,
        }),
    };
  });
  const y = (program.inputGradient ? op(x, ...params) : op(...params)) as tf.Tensor4D;
  // The statistics were kept out of the op's own scope: into the caller's, as its other tensors.
  const all = tf.clone(kept!);
  kept!.dispose();
  const statistics = shapes.map((shape, k) => ({
    mean: tf.slice(all, statOffsets[k]!, shape.channels) as tf.Tensor1D,
    variance: tf.slice(all, statOffsets[k]! + shape.channels, shape.channels) as tf.Tensor1D,
    count: shape.rows,
  }));
  all.dispose();
  return { y, statistics };
};

interface BackwardLayout {
  readonly shapes: readonly BatchNormShape[];
  readonly statOffsets: readonly number[];
  readonly bnIndex: ReadonlyMap<TrunkBatchNorm, number>;
  readonly reads: ReturnType<typeof backwardReads>;
  readonly paramCount: number;
}

/** The chain's gradients, [dx, ...dparams], from dy (fp32) and what the forward saved. */
const backward = (
  program: TrunkProgram,
  dy: tf.Tensor,
  saved: tf.Tensor[],
  layout: BackwardLayout,
): tf.Tensor[] => {
  const { shapes, statOffsets, bnIndex, reads, paramCount } = layout;
  const backend = tf.backend() as unknown as WasmBackendLike;
  const dnnl = loadDnnl()!;
  const params = saved.slice(0, paramCount);
  const statistics = saved[paramCount]!;
  const { read, lastReadAt } = reads;
  const savedCount = read.filter((r) => r).length;
  const savedBuffers = saved.slice(paramCount + 1, paramCount + 1 + savedCount);
  let nextBuffer = 0;
  const buffers = read.map((r) => r ? savedBuffers[nextBuffer++] : undefined);
  const workspaceTensors = saved.slice(paramCount + 1 + savedCount);
  let nextWorkspace = 0;
  const workspaces = shapes.map((shape) => shape.relu ? workspaceTensors[nextWorkspace++] : undefined);
  // The heap may grow (and move) on any allocation: pointers are taken right before each call.
  const p = (info: { dataId: object; shape: readonly number[] }, byteOffset = 0) =>
    heapPointer(backend, info, byteOffset);
  const gradients: (Gradient | undefined)[] = program.buffers.map(() => undefined);
  /** Drops one holder of `g`: the last frees its buffer. */
  const drop = (g: Gradient) => {
    if (--g.holders === 0) backend.disposeData(g.info.dataId);
  };
  const release = (index: number) => {
    const g = gradients[index];
    if (g === undefined) return;
    gradients[index] = undefined;
    drop(g);
  };
  /** Adds `g` to buffer `index`'s gradient: takes it as that gradient (one more holder) or sums into it. */
  const accumulate = (index: number, g: Gradient) => {
    const current = gradients[index];
    if (current === undefined) {
      gradients[index] = g;
      g.holders++;
      return;
    }
    const size = sizeOf(program.buffers[index]!);
    if (current.holders === 1) {
      dnnl.elementwise.add(size, false, p(current.info), p(g.info), p(current.info), "bf16");
      return;
    }
    const sum = bf16Buffer(backend, program.buffers[index]!);
    dnnl.elementwise.add(size, false, p(current.info), p(g.info), p(sum), "bf16");
    release(index);
    gradients[index] = { info: sum, holders: 1 };
  };
  /**
   * Where a node whose input has its output's shape (batch norm, ReLU's gradient) writes its input
   * gradient: over its output's gradient when nothing else holds that (oneDNN runs both in place),
   * else in a fresh buffer. Either way the caller then releases the output's gradient.
   */
  const inPlace = (output: number): TensorInfo => {
    const g = gradients[output]!;
    if (g.holders > 1) return bf16Buffer(backend, program.buffers[output]!);
    g.holders++;
    return g.info;
  };
  /** A node's input gradient `info` (a fresh buffer) handed to the buffers in `targets`. */
  const handTo = (info: TensorInfo, targets: readonly number[]) => {
    const g: Gradient = { info, holders: 1 };
    for (const target of targets) if (target !== 0 || program.inputGradient) accumulate(target, g);
    drop(g);
  };
  const paramGradients: (TensorInfo | undefined)[] = params.map(() => undefined);
  const f32 = (shape: readonly number[]) => backend.makeOutput([...shape], "float32");

  const top = bf16Buffer(backend, program.buffers[program.output]!);
  dnnl.elementwise.convert(dy.size, "f32", p(dy), p(top));
  gradients[program.output] = { info: top, holders: 1 };
  for (let i = program.nodes.length - 1; i >= 0; i--) {
    const node = program.nodes[i]!;
    const upstream = gradients[node.output];
    kernelInvariant(upstream !== undefined, () => `bf16 trunk: node ${i}'s output has no gradient`);
    if (node.kind === "convolution") {
      const g = node.shape;
      const dw = f32(params[node.weight]!.shape);
      const scratchBytes = dnnl.bf16Conv.scratchBytes(g);
      const scratch = scratchBytes > 0 ? backend.makeOutput([scratchBytes / 4], "float32") : undefined;
      dnnl.bf16Conv.backwardWeights(
        g,
        p(buffers[node.input]!),
        p(upstream.info),
        p(dw),
        scratch === undefined ? undefined : p(scratch),
      );
      if (scratch !== undefined) backend.disposeData(scratch.dataId);
      paramGradients[node.weight] = dw;
      if (node.input === 0 && !program.inputGradient) {
        release(node.output);
      } else {
        const dx = bf16Buffer(backend, program.buffers[node.input]!);
        dnnl.bf16Conv.backwardData(g, p(upstream.info), p(params[node.weight]!), p(dx));
        release(node.output);
        handTo(dx, [node.input]);
      }
    } else if (node.kind === "batchNorm") {
      const k = bnIndex.get(node)!;
      const shape = shapes[k]!;
      const [dgamma, dbeta] = [f32([shape.channels]), f32([shape.channels])];
      const dx = inPlace(node.output);
      dnnl.batchNorm.backward(shape, {
        x: p(buffers[node.input]!),
        mean: p(statistics, 4 * statOffsets[k]!),
        variance: p(statistics, 4 * (statOffsets[k]! + shape.channels)),
        gamma: p(params[node.gamma]!),
        beta: p(params[node.beta]!),
        workspace: workspaces[k] === undefined ? undefined : p(workspaces[k]!),
        dy: p(upstream.info),
        dx: p(dx),
        dgamma: p(dgamma),
        dbeta: p(dbeta),
      });
      paramGradients[node.gamma] = dgamma;
      paramGradients[node.beta] = dbeta;
      release(node.output);
      handTo(dx, [node.input]);
    } else {
      const dx = inPlace(node.output);
      dnnl.elementwise.reluBackward(
        sizeOf(program.buffers[node.output]!),
        p(upstream.info),
        p(buffers[node.output]!),
        p(dx),
        "bf16",
      );
      release(node.output);
      handTo(dx, [node.a, node.b]);
    }
    // What the forward saved for the nodes from here on only: freed now, not when the tape goes.
    for (const b of lastReadAt.get(i) ?? []) buffers[b]!.dispose();
    if (node.kind === "batchNorm") workspaces[bnIndex.get(node)!]?.dispose();
  }
  let dx: TensorInfo | undefined;
  if (program.inputGradient) {
    const input = gradients[0];
    kernelInvariant(input !== undefined, () => "bf16 trunk: the input has no gradient");
    dx = f32(program.buffers[0]!);
    dnnl.elementwise.convert(sizeOf(dx.shape), "bf16", p(input.info), p(dx));
    release(0);
  }
  kernelInvariant(
    gradients.every((g) => g === undefined) && paramGradients.every((g) => g !== undefined),
    () => "bf16 trunk: a gradient was left over or never written",
  );
  const tensor = (info: TensorInfo) => tf.engine().makeTensorFromTensorInfo(info);
  const grads = paramGradients.map((g) => tensor(g!));
  return dx === undefined ? grads : [tensor(dx), ...grads];
};
