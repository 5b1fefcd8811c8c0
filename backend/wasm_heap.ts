/**
 * Direct float32 access to tensors on the TF.js wasm backend's heap, for
 * host-side passes that would otherwise be many small kernels (LARC-SGD, the
 * prototypes' row normalisation). Outputs are fresh tensors written once
 * before anyone sees them: no tensor is ever changed in place.
 */
import * as tf from "@tensorflow/tfjs";

/** The parts of the wasm backend used here (its heap and the tensors' offsets on it). */
interface WasmHeapBackend {
  readonly wasm: { readonly HEAPF32: Float32Array };
  readonly dataIdMap: { get(dataId: object): { memoryOffset: number } | undefined };
  makeOutput(shape: number[], dtype: "float32"): tf.TensorInfo;
}

export interface WasmHeap {
  /** A new float32 tensor of `shape`, uninitialised until written through `view`. */
  output(shape: readonly number[]): tf.TensorInfo;
  /**
   * A float32 view of a tensor's data. Valid until the next allocation (which
   * may grow the heap): allocate every output first, then take the views.
   */
  view(t: { readonly dataId: object; readonly shape: readonly number[] }): Float32Array;
  /** The engine's tensor for an output written through `view`. */
  tensor<R extends tf.Rank>(info: tf.TensorInfo): tf.Tensor<R>;
}

/** Heap access when the active backend is wasm; undefined on every other backend. */
export const wasmHeap = (): WasmHeap | undefined => {
  if (tf.getBackend() !== "wasm") return undefined;
  const backend = tf.backend() as unknown as WasmHeapBackend;
  return {
    output: (shape) => backend.makeOutput([...shape], "float32"),
    view: (t) => {
      const entry = backend.dataIdMap.get(t.dataId);
      if (entry === undefined) throw new Error("wasmHeap: the tensor is not on the wasm heap");
      const size = t.shape.reduce((a, b) => a * b, 1);
      return new Float32Array(backend.wasm.HEAPF32.buffer, entry.memoryOffset, size);
    },
    tensor: <R extends tf.Rank>(info: tf.TensorInfo) =>
      tf.engine().makeTensorFromTensorInfo(info) as tf.Tensor<R>,
  };
};
