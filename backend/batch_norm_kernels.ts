/**
 * Batch normalisation in training mode through oneDNN (backend/batch_norm.ts
 * chooses it when `nativeBatchNormActive()`): forward with the statistics and
 * an optional fused ReLU, and the backward, each one oneDNN primitive over the
 * NHWC activations instead of ~10 (forward) and ~20 (backward) wasm ops.
 */
import * as tf from "@tensorflow/tfjs";
import { kernelInvariant } from "./invariant.ts";
import { activeKernelSettings } from "./kernel_settings.ts";
import { loadDnnl } from "./onednn.ts";
import { blasEnabled } from "./openblas.ts";
import { heapPointer, type WasmBackendLike } from "./wasm_heap.ts";
import type { KernelArgs } from "./wasm_kernels.ts";

type TensorInfo = tf.TensorInfo;

/** Outputs [y, mean, variance] (+ [workspace] with relu); attrs {epsilon, relu}. */
export const BATCH_NORM_TRAIN = "SwavBatchNormTrain";
/** Inputs {x, mean, variance, gamma, beta, dy} (+ workspace with relu); outputs [dx, dgamma, dbeta]. */
export const BATCH_NORM_TRAIN_GRAD = "SwavBatchNormTrainGrad";

let nativeBatchNormRegistered = false;

/** Whether batch norm runs through oneDNN now: wasm backend, acceleration on, oneDNN loaded. */
export const nativeBatchNormActive = (): boolean =>
  nativeBatchNormRegistered && activeKernelSettings().dnnl && activeKernelSettings().nativeBatchNorm &&
  tf.getBackend() === "wasm" && blasEnabled() &&
  loadDnnl() !== undefined;

interface BatchNormAttrs {
  readonly epsilon: number;
  readonly relu: boolean;
}

const batchNormShapeOf = (x: TensorInfo, attrs: BatchNormAttrs) => {
  const channels = x.shape[x.shape.length - 1]!;
  const [height, width] = x.shape.length === 4 ? [x.shape[1]!, x.shape[2]!] : [1, 1];
  return { rows: x.shape.reduce((a, b) => a * b, 1) / channels, height, width, channels, ...attrs };
};

/** Registers the two kernels where oneDNN loads; safe to call more than once. */
export const registerBatchNormKernels = (): void => {
  if (nativeBatchNormRegistered || loadDnnl() === undefined) return;
  tf.registerKernel({
    kernelName: BATCH_NORM_TRAIN,
    backendName: "wasm",
    kernelFunc: (({ inputs, backend: b, attrs }: KernelArgs) => {
      const backend = b as unknown as WasmBackendLike;
      const { x, gamma, beta } = inputs as Record<"x" | "gamma" | "beta", TensorInfo>;
      const shape = batchNormShapeOf(x!, attrs as unknown as BatchNormAttrs);
      const dnnl = loadDnnl()!;
      const y = backend.makeOutput([...x!.shape], "float32");
      const mean = backend.makeOutput([shape.channels], "float32");
      const variance = backend.makeOutput([shape.channels], "float32");
      // The ReLU mask oneDNN's backward reads, held as an opaque float32 tensor (never computed on).
      const workspace = shape.relu
        ? backend.makeOutput([Math.ceil(dnnl.batchNorm.workspaceBytes(shape) / 4)], "float32")
        : undefined;
      const p = (info: TensorInfo) => heapPointer(backend, info); // after every allocation
      dnnl.batchNorm.forward(shape, {
        x: p(x!),
        gamma: p(gamma!),
        beta: p(beta!),
        y: p(y),
        mean: p(mean),
        variance: p(variance),
        workspace: workspace === undefined ? undefined : p(workspace),
      });
      return workspace === undefined ? [y, mean, variance] : [y, mean, variance, workspace];
    }) as unknown as tf.KernelFunc,
  });
  tf.registerKernel({
    kernelName: BATCH_NORM_TRAIN_GRAD,
    backendName: "wasm",
    kernelFunc: (({ inputs, backend: b, attrs }: KernelArgs) => {
      const backend = b as unknown as WasmBackendLike;
      const { x, mean, variance, gamma, beta, dy, workspace } = inputs as Record<string, TensorInfo>;
      const shape = batchNormShapeOf(x!, attrs as unknown as BatchNormAttrs);
      kernelInvariant(
        !(shape.relu && workspace === undefined),
        () => `${BATCH_NORM_TRAIN_GRAD}: relu needs the workspace`,
      );
      const dx = backend.makeOutput([...x!.shape], "float32");
      const dgamma = backend.makeOutput([shape.channels], "float32");
      const dbeta = backend.makeOutput([shape.channels], "float32");
      const p = (info: TensorInfo) => heapPointer(backend, info);
      loadDnnl()!.batchNorm.backward(shape, {
        x: p(x!),
        mean: p(mean!),
        variance: p(variance!),
        gamma: p(gamma!),
        beta: p(beta!),
        workspace: workspace === undefined ? undefined : p(workspace),
        dy: p(dy!),
        dx: p(dx),
        dgamma: p(dgamma),
        dbeta: p(dbeta),
      });
      return [dx, dgamma, dbeta];
    }) as unknown as tf.KernelFunc,
  });
  nativeBatchNormRegistered = true;
};
