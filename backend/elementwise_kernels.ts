/**
 * A residual block's closing `relu(y + shortcut)` and same-shape sums through oneDNN
 * (backend/onednn_eltwise.ts) on the wasm backend, where tfjs-backend-wasm runs them on one thread:
 *
 * - `addRelu(a, b)`: one kernel forward (the sum with ReLU fused) and one backward (dy where the
 *   output is positive, handed to both inputs), instead of Add and Relu forward and Step, Cast and
 *   Multiply backward. Where oneDNN does not run it is `tf.relu(tf.add(a, b))`, and the values are
 *   the same either way: a float32 sum, max(·, 0), and a gradient that passes dy or 0.
 * - TF.js's `Add` on two float32 tensors of one shape and at least `NATIVE_ADD_MIN_SIZE` values
 *   (the gradient tape sums the gradients of a tensor used twice, a residual block's input) runs
 *   through oneDNN; any other Add goes to the wasm kernel.
 */
import * as tf from "@tensorflow/tfjs";
import { activeKernelSettings } from "./kernel_settings.ts";
import { loadDnnl } from "./onednn.ts";
import { blasEnabled } from "./openblas.ts";
import { heapPointer, type WasmBackendLike } from "./wasm_heap.ts";
import type { KernelArgs, KernelFunc } from "./wasm_kernels.ts";

type TensorInfo = tf.TensorInfo;

/** Inputs {a, b} of one shape, float32: outputs [max(a + b, 0)]. */
export const ADD_RELU = "SwavAddRelu";
/** Inputs {dy, y} with y a ReLU's output: outputs [dy where y > 0, else 0]. */
export const RELU_GRAD_FROM_OUTPUT = "SwavReluGradFromOutput";
/** Below this many values a sum stays on the wasm kernel (a oneDNN call's fixed cost outweighs it). */
export const NATIVE_ADD_MIN_SIZE = 1 << 14;

let registered = false;

/** Whether the element-wise kernels run through oneDNN now: wasm backend, acceleration on, oneDNN loaded. */
export const nativeElementwiseActive = (): boolean =>
  registered && activeKernelSettings().dnnl && activeKernelSettings().nativeElementwise &&
  tf.getBackend() === "wasm" && blasEnabled() && loadDnnl() !== undefined;

const sizeOf = (t: TensorInfo) => t.shape.reduce((p, q) => p * q, 1);
const sameShape = (a: TensorInfo, b: TensorInfo) =>
  a.shape.length === b.shape.length && a.shape.every((n, i) => n === b.shape[i]);

/**
 * max(a + b, 0) for two float32 tensors of one shape, with its gradient (the same dy, zero where
 * the output is not positive, for both). Through oneDNN where `nativeElementwiseActive()`.
 */
export const addRelu = <T extends tf.Tensor>(a: T, b: T): T => {
  if (!nativeElementwiseActive() || a.dtype !== "float32" || b.dtype !== "float32" || !sameShape(a, b)) {
    return tf.relu(tf.add(a, b)) as T;
  }
  const op = tf.customGrad((...args: (tf.Tensor | tf.GradSaveFunc)[]) => {
    const [aIn, bIn] = args as [tf.Tensor, tf.Tensor];
    const save = args[2] as tf.GradSaveFunc;
    const y = tf.engine().runKernel(ADD_RELU, { a: aIn, b: bIn }, {}) as tf.Tensor;
    save([y]);
    return {
      value: y as T,
      gradFunc: (dy: tf.Tensor, saved: tf.Tensor[]) => {
        const dx = tf.engine().runKernel(RELU_GRAD_FROM_OUTPUT, { dy, y: saved[0]! }, {}) as tf.Tensor;
        // Two tensors on one buffer: the tape disposes each input's gradient on its own.
        return [dx, dx.clone()];
      },
    };
  });
  return op(a, b) as T;
};

/**
 * A float32 output shaped like `first`, written by `op` from the two inputs (pointers taken after the
 * output's allocation, which may grow the heap).
 */
const binaryOutput = (
  backend: WasmBackendLike,
  first: TensorInfo,
  second: TensorInfo,
  op: (size: number, first: Deno.PointerValue, second: Deno.PointerValue, out: Deno.PointerValue) => void,
): TensorInfo => {
  const out = backend.makeOutput([...first.shape], "float32");
  op(sizeOf(first), heapPointer(backend, first), heapPointer(backend, second), heapPointer(backend, out));
  return out;
};

/** TF.js's Add through oneDNN for two float32 tensors of one shape and `NATIVE_ADD_MIN_SIZE` values or more. */
const nativeAdd = (fallback: KernelFunc) => (args: KernelArgs): TensorInfo => {
  const { a, b } = args.inputs as Record<string, TensorInfo>;
  if (
    !nativeElementwiseActive() || a!.dtype !== "float32" || b!.dtype !== "float32" || !sameShape(a!, b!) ||
    sizeOf(a!) < NATIVE_ADD_MIN_SIZE
  ) {
    return fallback(args);
  }
  return binaryOutput(
    args.backend as WasmBackendLike,
    a!,
    b!,
    (size, x, y, out) => loadDnnl()!.elementwise.add(size, false, x, y, out),
  );
};

/** Registers the kernels and replaces wasm's Add where oneDNN loads; safe to call more than once. */
export const registerElementwiseKernels = (): void => {
  if (registered || loadDnnl() === undefined) return;
  const kernel = (
    name: string,
    f: (inputs: Record<string, TensorInfo>, backend: WasmBackendLike) => TensorInfo,
  ) =>
    tf.registerKernel({
      kernelName: name,
      backendName: "wasm",
      kernelFunc: ((args: KernelArgs) =>
        f(
          args.inputs as Record<string, TensorInfo>,
          args.backend as WasmBackendLike,
        )) as unknown as tf.KernelFunc,
    });
  kernel(
    ADD_RELU,
    ({ a, b }, backend) =>
      binaryOutput(backend, a!, b!, (size, x, y, out) => loadDnnl()!.elementwise.add(size, true, x, y, out)),
  );
  kernel(
    RELU_GRAD_FROM_OUTPUT,
    ({ dy, y }, backend) =>
      binaryOutput(
        backend,
        dy!,
        y!,
        (size, d, o, dx) => loadDnnl()!.elementwise.reluBackward(size, d, o, dx),
      ),
  );
  const original = tf.getKernel("Add", "wasm");
  if (original !== undefined) {
    tf.unregisterKernel("Add", "wasm");
    tf.registerKernel({
      kernelName: "Add",
      backendName: "wasm",
      setupFunc: original.setupFunc,
      kernelFunc: nativeAdd(original.kernelFunc as unknown as KernelFunc) as unknown as tf.KernelFunc,
    });
  }
  registered = true;
};
