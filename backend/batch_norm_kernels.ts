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
import { activeCommunicator } from "./communicator.ts";
import { globalGradientSums } from "./sync_batch_norm.ts";
import { heapPointer, heapView, type WasmBackendLike } from "./wasm_heap.ts";
import type { KernelArgs } from "./wasm_kernels.ts";

type TensorInfo = tf.TensorInfo;

/**
 * Inputs {x, gamma, beta}: outputs [y, mean, variance] (+ [workspace] with relu), the batch's statistics.
 * Inputs {x, gamma, beta, mean, variance} (synchronised batch norm's global statistics): outputs [y]
 * (+ [workspace]). Attrs {epsilon, relu}.
 */
export const BATCH_NORM_TRAIN = "SwavBatchNormTrain";
/**
 * Inputs {x, mean, variance, gamma, beta, dy} (+ workspace with relu); outputs [dx, dgamma, dbeta]. Attrs
 * {epsilon, relu, globalCount}: globalCount > 0 (synchronised batch norm, the values per channel over all
 * ranks) all-reduces Σ dy and Σ dy·x̂ for dx; dgamma and dbeta stay this rank's sums.
 */
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
  readonly globalCount?: number;
}

const batchNormShapeOf = (x: TensorInfo, { epsilon, relu }: BatchNormAttrs) => {
  const channels = x.shape[x.shape.length - 1]!;
  const [height, width] = x.shape.length === 4 ? [x.shape[1]!, x.shape[2]!] : [1, 1];
  return { rows: x.shape.reduce((a, b) => a * b, 1) / channels, height, width, channels, epsilon, relu };
};

/**
 * Turns oneDNN's dx, computed with this rank's Σ dy (dbeta) and Σ dy·x̂ (dgamma)
 * over its n values, into dx with the sums over all ranks' N values, in place:
 * dx = γ·s·(dy − Σdy/N − x̂·Σdy·x̂/N) with s = 1/√(var + ε) and x̂ = (x − mean)·s
 * differs from oneDNN's by p_c + q_c·x per channel, with
 * q = γ·s²·(dgamma/n − Σdy·x̂/N) and p = γ·s·(dbeta/n − Σdy/N) − q·mean.
 */
const synchroniseInputGradient = (
  views: Record<"dx" | "x" | "mean" | "variance" | "gamma" | "dgamma" | "dbeta", Float32Array>,
  epsilon: number,
  globalCount: number,
): void => {
  const { dx, x, mean, variance, gamma, dgamma, dbeta } = views;
  const channels = mean.length;
  const count = x.length / channels;
  const sums = globalGradientSums(activeCommunicator(), dbeta, dgamma);
  const p = new Float64Array(channels);
  const q = new Float64Array(channels);
  for (let c = 0; c < channels; c++) {
    const s = 1 / Math.sqrt(variance[c]! + epsilon);
    q[c] = gamma[c]! * s * s * (dgamma[c]! / count - sums[channels + c]! / globalCount);
    p[c] = gamma[c]! * s * (dbeta[c]! / count - sums[c]! / globalCount) - q[c]! * mean[c]!;
  }
  for (let i = 0, c = 0; i < dx.length; i++) {
    dx[i] = dx[i]! + p[c]! + q[c]! * x[i]!;
    if (++c === channels) c = 0;
  }
};

/** Registers the two kernels where oneDNN loads; safe to call more than once. */
export const registerBatchNormKernels = (): void => {
  if (nativeBatchNormRegistered || loadDnnl() === undefined) return;
  tf.registerKernel({
    kernelName: BATCH_NORM_TRAIN,
    backendName: "wasm",
    kernelFunc: (({ inputs, backend: b, attrs }: KernelArgs) => {
      const backend = b as unknown as WasmBackendLike;
      const { x, gamma, beta, mean: givenMean, variance: givenVariance } = inputs as Record<
        string,
        TensorInfo
      >;
      const shape = batchNormShapeOf(x!, attrs as unknown as BatchNormAttrs);
      const dnnl = loadDnnl()!;
      const given = givenMean !== undefined && givenVariance !== undefined;
      const y = backend.makeOutput([...x!.shape], "float32");
      const mean = given ? givenMean : backend.makeOutput([shape.channels], "float32");
      const variance = given ? givenVariance : backend.makeOutput([shape.channels], "float32");
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
      }, given);
      const statistics = given ? [] : [mean, variance];
      return workspace === undefined ? [y, ...statistics] : [y, ...statistics, workspace];
    }) as unknown as tf.KernelFunc,
  });
  tf.registerKernel({
    kernelName: BATCH_NORM_TRAIN_GRAD,
    backendName: "wasm",
    kernelFunc: (({ inputs, backend: b, attrs }: KernelArgs) => {
      const backend = b as unknown as WasmBackendLike;
      const { x, mean, variance, gamma, beta, dy, workspace } = inputs as Record<string, TensorInfo>;
      const bnAttrs = attrs as unknown as BatchNormAttrs;
      const shape = batchNormShapeOf(x!, bnAttrs);
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
      const globalCount = bnAttrs.globalCount ?? 0;
      if (globalCount > 0) {
        const v = (info: TensorInfo) => heapView(backend, info);
        synchroniseInputGradient(
          {
            dx: v(dx),
            x: v(x!),
            mean: v(mean!),
            variance: v(variance!),
            gamma: v(gamma!),
            dgamma: v(dgamma),
            dbeta: v(dbeta),
          },
          shape.epsilon,
          globalCount,
        );
      }
      return [dx, dgamma, dbeta];
    }) as unknown as tf.KernelFunc,
  });
  nativeBatchNormRegistered = true;
};
