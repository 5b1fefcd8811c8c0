/**
 * The bf16 copies of a convolution's x and dy (backend/onednn.ts `CopyBuffers`) on the wasm heap, for
 * their call only: allocated in memory that tensors freed earlier left, so no buffer of their own is
 * held between calls. The copy of dy that oneDNN keeps for the filter gradient following a layer's
 * input gradient (`Dnnl.heldDyCopy`) stays until another copy takes its place.
 */
import type * as tf from "@tensorflow/tfjs";
import type { CopyBuffers, Dnnl, DnnlConvShape, DnnlDirection } from "./onednn.ts";
import { heapPointer, type WasmBackendLike } from "./wasm_heap.ts";

type TensorInfo = tf.TensorInfo;

/** The heap buffer holding the copy of dy that oneDNN holds now. */
let heldDyCopy: { readonly backend: WasmBackendLike; readonly info: TensorInfo } | undefined;

const freeHeld = () => {
  try {
    heldDyCopy?.backend.disposeData(heldDyCopy.info.dataId);
  } catch {
    // that backend is gone, and its heap with it
  }
};

export interface HeapCopies {
  /** The copies' pointers (taken now: call after every other allocation of the kernel). */
  buffers(): CopyBuffers;
  /** After the call: frees the copies, but the copy of dy if oneDNN holds it now. */
  release(): void;
}

/** Allocates the copies one call of `dnnl.run` makes (none where it runs fp32). */
export const heapCopies = (
  backend: WasmBackendLike,
  dnnl: Dnnl,
  direction: DnnlDirection,
  shape: DnnlConvShape,
): HeapCopies => {
  const bytes = dnnl.copyBytes(direction, shape);
  const allocate = (n: number) => n > 0 ? backend.makeOutput([Math.ceil(n / 4)], "float32") : undefined;
  const [x, dy] = [allocate(bytes.x), allocate(bytes.dy)];
  let dyPointer: Deno.PointerValue | undefined;
  return {
    buffers: () => {
      const p = (info: TensorInfo | undefined) => info === undefined ? undefined : heapPointer(backend, info);
      dyPointer = p(dy);
      return {
        x: p(x),
        dy: dyPointer,
        held: heldDyCopy?.backend === backend ? p(heldDyCopy.info) : undefined,
      };
    },
    release: () => {
      if (x !== undefined) backend.disposeData(x.dataId);
      if (dy === undefined) return;
      const held = dnnl.heldDyCopy();
      if (held === undefined || dyPointer === undefined || !Deno.UnsafePointer.equals(held, dyPointer)) {
        backend.disposeData(dy.dataId);
        return;
      }
      freeHeld();
      heldDyCopy = { backend, info: dy };
    },
  };
};
