/**
 * A PyTorch tensor record (`TensorRef`: storage, offset, shape, stride) made into values, after
 * checking its extent against its storage's bytes.
 *
 * Element counts are capped by the bytes that back them: a tensor with more elements than its
 * storage (stride 0, as `expand` makes, or overlapping strides) is materialised only up to
 * `MAX_OVERLAP_ELEMENTS`, and the elements materialised across one file are capped by its
 * `ElementBudget`. The copy yields to the event loop as it goes (Ctrl-C stays responsive).
 */
import type { Pause } from "./zip.ts";
import type { TensorRef, TorchDType } from "./torch_pickle.ts";

/** One tensor of the state dict, row-major. */
export interface TorchTensor {
  readonly dtype: TorchDType;
  readonly shape: readonly number[];
  readonly values: Float32Array | Float64Array;
}

/** The most elements one tensor may have (2^31, 8 GiB of float32: far above any ResNet weight). */
export const MAX_ELEMENTS = 2 ** 31;
/** The most elements of a tensor that has more elements than its storage (2^20: 4 MiB of float32). */
export const MAX_OVERLAP_ELEMENTS = 2 ** 20;

/**
 * Elements a file may still have materialised: twice the elements its storages hold (a weight
 * tied under two names is read twice) plus `MAX_OVERLAP_ELEMENTS`. Many views of one storage
 * cannot multiply it past that.
 */
export interface ElementBudget {
  left: number;
}

const halfToFloat = (h: number): number => {
  const sign = h & 0x8000 ? -1 : 1;
  const exponent = (h >> 10) & 0x1f;
  const fraction = h & 0x3ff;
  if (exponent === 0) return sign * fraction * 2 ** -24;
  if (exponent === 31) return fraction ? Number.NaN : sign * Infinity;
  return sign * (1 + fraction / 1024) * 2 ** (exponent - 15);
};

/** Element `i` of a storage's bytes as a number (little-endian). */
const elementReader = (dtype: TorchDType, bytes: Uint8Array): (i: number) => number => {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const scratch = new DataView(new ArrayBuffer(4));
  switch (dtype) {
    case "float32":
      return (i) => view.getFloat32(4 * i, true);
    case "float64":
      return (i) => view.getFloat64(8 * i, true);
    case "float16":
      return (i) => halfToFloat(view.getUint16(2 * i, true));
    case "bfloat16":
      return (i) => {
        scratch.setUint32(0, view.getUint16(2 * i, true) << 16);
        return scratch.getFloat32(0);
      };
    case "int64":
      return (i) => Number(view.getBigInt64(8 * i, true));
    case "int32":
      return (i) => view.getInt32(4 * i, true);
    case "int16":
      return (i) => view.getInt16(2 * i, true);
    case "int8":
      return (i) => view.getInt8(i);
    case "uint8":
    case "bool":
      return (i) => view.getUint8(i);
  }
};

/** Whether the tensor's strides are row-major contiguous (dimensions of size 1 have any stride). */
const isContiguous = (ref: TensorRef): boolean => {
  let expected = 1;
  for (let d = ref.shape.length - 1; d >= 0; d--) {
    if (ref.shape[d]! !== 1 && ref.stride[d]! !== expected) return false;
    expected *= ref.shape[d]!;
  }
  return true;
};

/**
 * The tensor's values, or why not: `bytes` are its storage's bytes, already checked to hold the
 * storage's claimed element count.
 */
export const materialise = async (
  ref: TensorRef,
  bytes: Uint8Array,
  budget: ElementBudget,
  pause: Pause,
): Promise<TorchTensor | string> => {
  const { type, numel } = ref.storage;
  let count = 1;
  let last = ref.offset;
  for (let d = 0; d < ref.shape.length; d++) {
    count *= ref.shape[d]!;
    if (ref.shape[d]! > 0) last += (ref.shape[d]! - 1) * ref.stride[d]!;
  }
  if (count > MAX_ELEMENTS) return `a tensor of shape [${ref.shape}] is larger than this reader accepts`;
  if (count > 0 && last >= numel) {
    return `shape [${ref.shape}] at offset ${ref.offset} runs past its storage of ${numel} elements`;
  }
  if (count > numel && count > MAX_OVERLAP_ELEMENTS) {
    return `shape [${ref.shape}] (${count} elements) repeats its storage of ${numel} elements (stride 0 ` +
      `or overlapping strides): over the ${MAX_OVERLAP_ELEMENTS} elements this reader expands`;
  }
  if (count > budget.left) {
    return `shape [${ref.shape}]: the file's tensors reuse their storages over and over ` +
      `(more elements than twice its storages hold)`;
  }
  budget.left -= count;
  if (type.dtype === "float32" && isContiguous(ref)) {
    // The common case (every weight torch.save writes from a module): one copy of the bytes.
    const values = new Float32Array(count);
    new Uint8Array(values.buffer).set(bytes.subarray(4 * ref.offset, 4 * (ref.offset + count)));
    return { dtype: type.dtype, shape: ref.shape, values };
  }
  const floating = type.dtype.startsWith("float") || type.dtype === "bfloat16";
  const values = floating ? new Float32Array(count) : new Float64Array(count);
  const read = elementReader(type.dtype, bytes);
  // Row-major walk with torch's strides (contiguous tensors are the common case of it).
  const index = new Array<number>(ref.shape.length).fill(0);
  let position = ref.offset;
  for (let i = 0; i < count; i++) {
    values[i] = read(position);
    for (let d = ref.shape.length - 1; d >= 0; d--) {
      index[d]!++;
      position += ref.stride[d]!;
      if (index[d]! < ref.shape[d]!) break;
      position -= ref.stride[d]! * ref.shape[d]!;
      index[d] = 0;
    }
    if ((i & 0xffff) === 0xffff) await pause();
  }
  return { dtype: type.dtype, shape: ref.shape, values };
};
