/**
 * Direct float32 access to tensors on the TF.js wasm backend's heap, for
 * kernels and host-side passes that would otherwise be many small kernels
 * (LARC-SGD, the prototypes' row normalisation, im2col). Outputs are fresh
 * tensors written once before anyone sees them: no tensor is ever changed in place.
 *
 * The wasm memory can grow (and detach old views) on any allocation, so views
 * and pointers are taken after every output has been allocated.
 */
import * as tf from "@tensorflow/tfjs";
import { kernelInvariant } from "./invariant.ts";

/** The parts of the wasm backend used here (its heap and the tensors' offsets on it). */
export interface WasmBackendLike extends tf.KernelBackend {
  readonly wasm: { readonly HEAPF32: Float32Array };
  readonly dataIdMap: { get(dataId: object): { memoryOffset: number } | undefined };
  makeOutput(shape: number[], dtype: "float32"): tf.TensorInfo;
}

type HeapTensor = { readonly dataId: object; readonly shape: readonly number[] };

/** The heap's current buffer. */
export const heapBuffer = (backend: WasmBackendLike): ArrayBufferLike => backend.wasm.HEAPF32.buffer;

/** Byte offset of a tensor's data on the heap. */
export const heapOffset = (backend: WasmBackendLike, t: HeapTensor): number => {
  const entry = backend.dataIdMap.get(t.dataId);
  kernelInvariant(entry !== undefined, () => "the tensor is not on the wasm heap");
  return entry.memoryOffset;
};

/** A float32 view of a tensor's data (valid until the next allocation). */
export const heapView = (backend: WasmBackendLike, t: HeapTensor): Float32Array =>
  new Float32Array(heapBuffer(backend), heapOffset(backend, t), t.shape.reduce((a, b) => a * b, 1));

/** A native pointer to byte `offset` of `buffer` (zero-copy; valid while the buffer is not detached). */
export const pointerAt = (buffer: ArrayBufferLike, byteOffset: number): Deno.PointerValue =>
  Deno.UnsafePointer.of(new Uint8Array(buffer as ArrayBuffer, byteOffset));

/** A native pointer to a tensor's data, `byteOffset` bytes in (valid until the next allocation). */
export const heapPointer = (backend: WasmBackendLike, t: HeapTensor, byteOffset = 0): Deno.PointerValue =>
  pointerAt(heapBuffer(backend), heapOffset(backend, t) + byteOffset);

export interface WasmHeap {
  /** A new float32 tensor of `shape`, uninitialised until written through `view`. */
  output(shape: readonly number[]): tf.TensorInfo;
  /**
   * A float32 view of a tensor's data. Valid until the next allocation (which
   * may grow the heap): allocate every output first, then take the views.
   */
  view(t: HeapTensor): Float32Array;
  /** The engine's tensor for an output written through `view`. */
  tensor<R extends tf.Rank>(info: tf.TensorInfo): tf.Tensor<R>;
}

/** Heap access when the active backend is wasm; undefined on every other backend. */
export const wasmHeap = (): WasmHeap | undefined => {
  if (tf.getBackend() !== "wasm") return undefined;
  const backend = tf.backend() as unknown as WasmBackendLike;
  return {
    output: (shape) => backend.makeOutput([...shape], "float32"),
    view: (t) => heapView(backend, t),
    tensor: <R extends tf.Rank>(info: tf.TensorInfo) =>
      tf.engine().makeTensorFromTensorInfo(info) as tf.Tensor<R>,
  };
};
