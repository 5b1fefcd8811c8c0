/**
 * One LARC-SGD update of one parameter as a single pass over the wasm heap.
 *
 * Written with tensor ops the update is ~15 kernels per parameter (two norms,
 * the trust ratio, `where`s, the momentum and parameter updates), each a
 * separate pass over memory plus a kernel launch: ~65 ms a step for the
 * ResNet-18 benchmark model against PyTorch's ~4 ms. Here the two norms are one
 * read of p and g (summed in float64), and the momentum buffer and parameter
 * are written in one more pass into fresh outputs that the variables are
 * assigned, so no tensor is ever changed in place.
 *
 * The arithmetic is `LarcSgd.step`'s (stages/optimise.ts), the reference for it.
 */
import type * as tf from "@tensorflow/tfjs";
import { kernelInvariant } from "./invariant.ts";
import { wasmHeap } from "./wasm_heap.ts";

export interface LarcHyper {
  readonly lr: number;
  readonly momentum: number;
  readonly weightDecay: number;
  readonly trustCoefficient: number;
  readonly eps: number;
  readonly clip: boolean;
}

/**
 * The trust-ratio scale and the weight decay that apply for these norms (apex
 * LARC: neither applies when either norm is 0).
 */
export const larcScale = (
  paramNorm: number,
  gradNorm: number,
  h: LarcHyper,
): { readonly scale: number; readonly decay: number } => {
  if (!(paramNorm > 0 && gradNorm > 0)) return { scale: 1, decay: 0 };
  let scale = (h.trustCoefficient * paramNorm) / (gradNorm + paramNorm * h.weightDecay + h.eps);
  if (h.clip) scale = Math.min(scale / h.lr, 1);
  return { scale, decay: h.weightDecay };
};

/**
 * Updates `param` and its momentum `slot` from `grad` on the wasm backend and
 * returns true; returns false (touching nothing) on any other backend, where
 * the caller runs the tensor-op version.
 */
export const fusedLarcStep = (
  param: tf.Variable,
  grad: tf.Tensor,
  slot: tf.Variable,
  h: LarcHyper,
): boolean => {
  const heap = wasmHeap();
  if (heap === undefined || param.dtype !== "float32" || grad.dtype !== "float32") return false;
  const size = param.size;
  kernelInvariant(
    grad.size === size && slot.size === size,
    () => `fusedLarcStep: sizes differ (param ${size}, grad ${grad.size}, slot ${slot.size})`,
  );
  // Allocate first: a heap view is only valid until the next allocation grows the heap.
  const nextParamInfo = heap.output(param.shape);
  const nextSlotInfo = heap.output(slot.shape);
  const p = heap.view(param);
  const g = heap.view(grad);
  const buf = heap.view(slot);
  const nextP = heap.view(nextParamInfo);
  const nextBuf = heap.view(nextSlotInfo);
  let pp = 0;
  let gg = 0;
  for (let i = 0; i < size; i++) {
    pp += p[i]! * p[i]!;
    gg += g[i]! * g[i]!;
  }
  const { scale, decay } = larcScale(Math.sqrt(pp), Math.sqrt(gg), h);
  const { momentum, lr } = h;
  for (let i = 0; i < size; i++) {
    const b = momentum * buf[i]! + (g[i]! + decay * p[i]!) * scale;
    nextBuf[i] = b;
    nextP[i] = p[i]! - lr * b;
  }
  const nextParam = heap.tensor(nextParamInfo);
  const nextSlot = heap.tensor(nextSlotInfo);
  param.assign(nextParam);
  slot.assign(nextSlot);
  nextParam.dispose();
  nextSlot.dispose();
  return true;
};
