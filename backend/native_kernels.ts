/**
 * Native kernels on the wasm backend: OpenBLAS (backend/openblas.ts) and, for
 * convolutions, oneDNN (backend/onednn.ts) first, registered on top of the
 * plain wasm kernels (backend/wasm_kernels.ts), which each falls back to.
 *
 * Convolutions run through oneDNN where it loads and takes the shape, else as
 * im2col + sgemm, in chunks of images so the column buffer (JS memory, reused)
 * stays a few MB whatever the batch:
 *
 *   Conv2D                out[rows, Co]  = col[rows, K] · W[K, Co]              (K = KH·KW·Ci)
 *   Conv2DBackpropFilter  dW[K, Co]     += col[rows, K]ᵀ · dy[rows, Co]         (summed over chunks)
 *   Conv2DBackpropInput   dcol[rows, K]  = dy[rows, Co] · W[K, Co]ᵀ, then col2im (scatter-add)
 *
 * A 1x1, stride-1, unpadded convolution needs no column buffer: x itself is
 * col. Tensors are read and written in place on the wasm heap (zero-copy).
 * Anything else (NCHW, dtype other than float32, BLAS off in the kernel
 * settings) goes to the kernel registered before.
 */
import * as tf from "@tensorflow/tfjs";
import { heapCopies } from "./bf16_copies.ts";
import { col2imAdd, type ConvGeometry, geometry, im2col, isPointwise } from "./im2col.ts";
import { activeKernelSettings } from "./kernel_settings.ts";
import { type DnnlConvShape, type DnnlDirection, loadDnnl } from "./onednn.ts";
import { type Blas, blasEnabled, loadBlas, Scratch } from "./openblas.ts";
import { heapBuffer, heapOffset, heapPointer, pointerAt, type WasmBackendLike } from "./wasm_heap.ts";
import type { KernelArgs, KernelFunc } from "./wasm_kernels.ts";

type TensorInfo = tf.TensorInfo;

/** Images per chunk so that a chunk's column buffer holds at most `chunkFloats`. */
const imagesPerChunk = (g: ConvGeometry) =>
  Math.max(
    1,
    Math.min(g.n, Math.floor(activeKernelSettings().chunkFloats / (g.oh * g.ow * g.kh * g.kw * g.ci))),
  );

type Sgemm = Blas["sgemm"];

/** A convolution kernel's attributes, as the three directions share them. */
interface ConvAttrs {
  readonly strides: number | [number, number];
  readonly dilations?: number | [number, number];
  readonly pad: tf.Conv2DAttrs["pad"];
  readonly dimRoundingMode?: "floor" | "round" | "ceil";
  readonly dataFormat?: string;
  /** Conv2DBackpropFilter's output shape. */
  readonly filterShape?: readonly number[];
  /** Conv2DBackpropInput's output shape. */
  readonly inputShape?: readonly number[];
}

/** What the OpenBLAS path of a native convolution starts from. */
interface OpenedConv {
  readonly backend: WasmBackendLike;
  readonly convInfo: tf.backend_util.Conv2DInfo;
  readonly g: ConvGeometry;
  /** The kernel's output shape: y (forward), dx (backwardData) or dW (backwardWeights). */
  readonly outShape: number[];
}

/**
 * The three native convolution kernels' common opening. Operands `a`, `b` are
 * the kernel's inputs: (x, filter) forward, (dy, filter) backwardData, (x, dy)
 * backwardWeights. Undefined (take the fallback kernel) unless BLAS runs, the
 * kernel's switch `on` is set and the data is float32 NHWC; then the output of
 * oneDNN where it takes the shape (`done`), else the geometry for OpenBLAS.
 */
const openNativeConv = (
  args: KernelArgs,
  on: boolean,
  direction: DnnlDirection,
  a: TensorInfo,
  b: TensorInfo,
): { readonly done: TensorInfo } | OpenedConv | undefined => {
  const attrs = args.attrs as unknown as ConvAttrs;
  if (!blasEnabled() || !on || a.dtype !== "float32" || !isNhwc(attrs.dataFormat)) return undefined;
  const backend = args.backend as WasmBackendLike;
  const inputShape = direction === "backwardData" ? attrs.inputShape! : a.shape;
  const filterShape = direction === "backwardWeights" ? attrs.filterShape! : b.shape;
  const convInfo = tf.backend_util.computeConv2DInfo(
    inputShape as [number, number, number, number],
    filterShape as [number, number, number, number],
    attrs.strides,
    attrs.dilations ?? 1,
    attrs.pad,
    attrs.dimRoundingMode,
  );
  const g = geometry(convInfo);
  const outShape = direction === "forward"
    ? convInfo.outShape
    : direction === "backwardData"
    ? [...inputShape]
    : [...filterShape];
  // oneDNN takes no empty convolution (the forward's output is empty also when Co is 0).
  const work = g.n * g.oh * g.ow * (direction === "forward" ? g.co : 1);
  const dnnl = work > 0 && activeKernelSettings().dnnl ? loadDnnl() : undefined;
  if (dnnl !== undefined) {
    const out = backend.makeOutput(outShape, "float32");
    const shape: DnnlConvShape = { ...g, bottom: convInfo.padInfo.bottom, right: convInfo.padInfo.right };
    const copies = heapCopies(backend, dnnl, direction, shape); // before any pointer is taken
    const p = (info: TensorInfo) => heapPointer(backend, info);
    const buffers = copies.buffers();
    // Operand order of Dnnl.run: (x | dx, w | dw, y | dy).
    const ran = direction === "forward"
      ? dnnl.run(direction, shape, p(a), p(b), p(out), undefined, buffers)
      : direction === "backwardData"
      ? dnnl.run(direction, shape, p(out), p(b), p(a), a.dataId, buffers)
      : dnnl.run(direction, shape, p(a), p(out), p(b), b.dataId, buffers);
    copies.release();
    if (ran) return { done: out };
    backend.disposeData(out.dataId);
  }
  return { backend, convInfo, g, outShape };
};

/**
 * im2col of `xs` in chunks of whole images (the shared scratch bounds the
 * column buffer); `gemm` consumes each chunk: its column pointer, its first
 * image and its row count.
 */
const forEachColumnChunk = (
  xs: Float32Array,
  g: ConvGeometry,
  scratch: Scratch,
  gemm: (colPtr: Deno.PointerValue, n0: number, rows: number) => void,
): void => {
  const per = imagesPerChunk(g);
  const rowsPerImage = g.oh * g.ow;
  const col = scratch.get(per * rowsPerImage * g.kh * g.kw * g.ci);
  const colPtr = Deno.UnsafePointer.of(col);
  for (let n0 = 0; n0 < g.n; n0 += per) {
    const n1 = Math.min(g.n, n0 + per);
    im2col(xs, g, n0, n1, col);
    gemm(colPtr, n0, (n1 - n0) * rowsPerImage);
  }
};

/** True unless the kernel was asked for a layout other than NHWC. */
const isNhwc = (dataFormat: string | undefined): boolean => dataFormat === undefined || dataFormat === "NHWC";

const blasConv2D = (
  blas: Blas,
  scratch: Scratch,
  fallback: KernelFunc,
  fused: boolean,
) =>
(args: KernelArgs): TensorInfo => {
  const attrs = args.attrs as unknown as tf.Conv2DAttrs & { activation?: string };
  const x = args.inputs["x"]!;
  const filter = args.inputs["filter"]!;
  // FusedConv2D with bias/activation/preluActivationWeights is left to XNNPACK.
  const plain = !fused ||
    ((attrs.activation === undefined || attrs.activation === "linear") && args.inputs["bias"] === undefined &&
      args.inputs["preluActivationWeights"] === undefined);
  const opened = openNativeConv(args, activeKernelSettings().blasConv2D && plain, "forward", x, filter);
  if (opened === undefined) return fallback(args);
  if ("done" in opened) return opened.done;
  const { backend, convInfo, g } = opened;
  // XNNPACK (tfjs-backend-wasm 4.22) returns wrong values when the stride exceeds the filter
  // extent with 'same' padding (e.g. 2x2 filter, stride 3): those always take this kernel.
  const strideBeyondFilter = g.sh > (g.kh - 1) * g.dh + 1 || g.sw > (g.kw - 1) * g.dw + 1;
  if (!isPointwise(g) && !strideBeyondFilter && g.kh * g.kw * g.ci < activeKernelSettings().minColumns) {
    return fallback(args);
  }
  const out = backend.makeOutput(convInfo.outShape, "float32");
  if (g.n * g.oh * g.ow * g.co === 0) return out;
  const k = g.kh * g.kw * g.ci;
  const buffer = heapBuffer(backend);
  const xOff = heapOffset(backend, x);
  const outOff = heapOffset(backend, out);
  const wPtr = pointerAt(buffer, heapOffset(backend, filter));
  if (isPointwise(g)) {
    const rows = g.n * g.h * g.w;
    blas.sgemm(
      false,
      false,
      rows,
      g.co,
      k,
      1,
      pointerAt(buffer, xOff),
      k,
      wPtr,
      g.co,
      0,
      pointerAt(buffer, outOff),
      g.co,
    );
    return out;
  }
  const xs = new Float32Array(buffer, xOff, g.n * g.h * g.w * g.ci);
  forEachColumnChunk(xs, g, scratch, (colPtr, n0, rows) =>
    blas.sgemm(
      false,
      false,
      rows,
      g.co,
      k,
      1,
      colPtr,
      k,
      wPtr,
      g.co,
      0,
      pointerAt(buffer, outOff + n0 * g.oh * g.ow * g.co * 4),
      g.co,
    ));
  return out;
};

const blasConv2DBackpropFilter =
  (blas: Blas, scratch: Scratch, fallback: KernelFunc) => (args: KernelArgs): TensorInfo => {
    const x = args.inputs["x"]!;
    const dy = args.inputs["dy"]!;
    const opened = openNativeConv(
      args,
      activeKernelSettings().blasConv2DBackpropFilter,
      "backwardWeights",
      x,
      dy,
    );
    if (opened === undefined) return fallback(args);
    if ("done" in opened) return opened.done;
    const { backend, g, outShape } = opened;
    const k = g.kh * g.kw * g.ci;
    const out = backend.makeOutput(outShape, "float32");
    const buffer = heapBuffer(backend);
    const dwPtr = pointerAt(buffer, heapOffset(backend, out));
    const xOff = heapOffset(backend, x);
    const dyOff = heapOffset(backend, dy);
    if (g.n * g.oh * g.ow === 0) {
      new Float32Array(buffer, heapOffset(backend, out), k * g.co).fill(0);
      return out;
    }
    if (isPointwise(g)) {
      const rows = g.n * g.h * g.w;
      blas.sgemm(
        true,
        false,
        k,
        g.co,
        rows,
        1,
        pointerAt(buffer, xOff),
        k,
        pointerAt(buffer, dyOff),
        g.co,
        0,
        dwPtr,
        g.co,
      );
      return out;
    }
    const xs = new Float32Array(buffer, xOff, g.n * g.h * g.w * g.ci);
    // dW accumulates over the chunks: beta 0 on the first, 1 after.
    forEachColumnChunk(xs, g, scratch, (colPtr, n0, rows) =>
      blas.sgemm(
        true,
        false,
        k,
        g.co,
        rows,
        1,
        colPtr,
        k,
        pointerAt(buffer, dyOff + n0 * g.oh * g.ow * g.co * 4),
        g.co,
        n0 === 0 ? 0 : 1,
        dwPtr,
        g.co,
      ));
    return out;
  };

const blasConv2DBackpropInput =
  (blas: Blas, scratch: Scratch, fallback: KernelFunc) => (args: KernelArgs): TensorInfo => {
    const dy = args.inputs["dy"]!;
    const filter = args.inputs["filter"]!;
    const opened = openNativeConv(
      args,
      activeKernelSettings().blasConv2DBackpropInput,
      "backwardData",
      dy,
      filter,
    );
    if (opened === undefined) return fallback(args);
    if ("done" in opened) return opened.done;
    const { backend, g, outShape } = opened;
    const k = g.kh * g.kw * g.ci;
    if (!isPointwise(g) && k < activeKernelSettings().minColumns) return fallback(args);
    const out = backend.makeOutput(outShape, "float32");
    const buffer = heapBuffer(backend);
    const outOff = heapOffset(backend, out);
    const dyOff = heapOffset(backend, dy);
    const wPtr = pointerAt(buffer, heapOffset(backend, filter));
    if (isPointwise(g)) {
      const rows = g.n * g.h * g.w;
      blas.sgemm(
        false,
        true,
        rows,
        k,
        g.co,
        1,
        pointerAt(buffer, dyOff),
        g.co,
        wPtr,
        g.co,
        0,
        pointerAt(buffer, outOff),
        k,
      );
      return out;
    }
    const dx = new Float32Array(buffer, outOff, g.n * g.h * g.w * g.ci);
    dx.fill(0);
    if (g.n * g.oh * g.ow === 0) return out;
    const per = imagesPerChunk(g);
    const rowsPerImage = g.oh * g.ow;
    const col = scratch.get(per * rowsPerImage * k);
    const colPtr = Deno.UnsafePointer.of(col);
    for (let n0 = 0; n0 < g.n; n0 += per) {
      const n1 = Math.min(g.n, n0 + per);
      const rows = (n1 - n0) * rowsPerImage;
      blas.sgemm(
        false,
        true,
        rows,
        k,
        g.co,
        1,
        pointerAt(buffer, dyOff + n0 * rowsPerImage * g.co * 4),
        g.co,
        wPtr,
        g.co,
        0,
        colPtr,
        k,
      );
      col2imAdd(col, g, n0, n1, dx);
    }
    return out;
  };

/** The BLAS product of BatchMatMul's operands; undefined where it does not take them (the caller falls back). */
const blasProduct = (sgemm: Sgemm) => (args: KernelArgs): TensorInfo | undefined => {
  const backend = args.backend as WasmBackendLike;
  const attrs = args.attrs as unknown as tf.BatchMatMulAttrs;
  const a = args.inputs["a"]!;
  const b = args.inputs["b"]!;
  if (
    !blasEnabled() || !activeKernelSettings().blasBatchMatMul || a.dtype !== "float32" ||
    b.dtype !== "float32"
  ) {
    return undefined;
  }
  const ta = attrs.transposeA;
  const tb = attrs.transposeB;
  const ar = a.shape.length;
  const br = b.shape.length;
  const m = ta ? a.shape[ar - 1]! : a.shape[ar - 2]!;
  const k = ta ? a.shape[ar - 2]! : a.shape[ar - 1]!;
  const kb = tb ? b.shape[br - 1]! : b.shape[br - 2]!;
  const n = tb ? b.shape[br - 2]! : b.shape[br - 1]!;
  const batchA = a.shape.slice(0, -2).reduce((p, q) => p * q, 1);
  const batchB = b.shape.slice(0, -2).reduce((p, q) => p * q, 1);
  // Plain batching only (equal batches, or one side shared); other broadcasts go to the wasm kernel.
  const outer = tf.backend_util.assertAndGetBroadcastShape(a.shape.slice(0, -2), b.shape.slice(0, -2));
  const batch = outer.reduce((p, q) => p * q, 1);
  if (k !== kb || !((batchA === batch || batchA === 1) && (batchB === batch || batchB === 1))) {
    return undefined;
  }
  const out = backend.makeOutput([...outer, m, n], "float32");
  if (m * n * batch === 0) return out;
  const buffer = heapBuffer(backend);
  const aOff = heapOffset(backend, a);
  const bOff = heapOffset(backend, b);
  const outOff = heapOffset(backend, out);
  if (k === 0) {
    new Float32Array(buffer, outOff, batch * m * n).fill(0);
    return out;
  }
  for (let i = 0; i < batch; i++) {
    sgemm(
      ta,
      tb,
      m,
      n,
      k,
      1,
      pointerAt(buffer, aOff + (batchA === 1 ? 0 : i * m * k * 4)),
      ta ? m : k,
      pointerAt(buffer, bOff + (batchB === 1 ? 0 : i * k * n * 4)),
      tb ? k : n,
      0,
      pointerAt(buffer, outOff + i * m * n * 4),
      n,
    );
  }
  return out;
};

const blasBatchMatMul = (sgemm: Sgemm, fallback: KernelFunc) => {
  const product = blasProduct(sgemm);
  return (args: KernelArgs): TensorInfo => product(args) ?? fallback(args);
};

/**
 * _FusedMatMul (tf.fused.matMul: a product, a bias broadcast over the last
 * axis, an activation) as the sgemm above followed by one pass over the
 * output for the bias [N] and a linear or ReLU activation; other activations
 * and a PReLU weight go to the wasm kernel. (tfjs-backend-wasm 4.22's own
 * kernel adds the bias wrongly when an operand is transposed: test/blas_test.ts.)
 */
const blasFusedMatMul = (sgemm: Sgemm, fallback: KernelFunc) => {
  const product = blasProduct(sgemm);
  return (args: KernelArgs): TensorInfo => {
    const backend = args.backend as WasmBackendLike;
    const { a, b, bias, preluActivationWeights } = args.inputs;
    const attrs = args.attrs as unknown as tf.BatchMatMulAttrs & { activation?: string };
    const activation = attrs.activation ?? "linear";
    const n = attrs.transposeB ? b!.shape[b!.shape.length - 2]! : b!.shape[b!.shape.length - 1]!;
    const simple = preluActivationWeights === undefined &&
      (activation === "linear" || activation === "relu") &&
      (bias === undefined || (bias.dtype === "float32" && bias.shape.length === 1 && bias.shape[0] === n));
    if (
      !simple || !blasEnabled() || !activeKernelSettings().blasBatchMatMul || a!.dtype !== "float32" ||
      b!.dtype !== "float32"
    ) {
      return fallback(args);
    }
    const ar = a!.shape.length;
    const k = attrs.transposeA ? a!.shape[ar - 2]! : a!.shape[ar - 1]!;
    const kb = attrs.transposeB ? b!.shape[b!.shape.length - 1]! : b!.shape[b!.shape.length - 2]!;
    if (k !== kb) return fallback(args);
    let out: TensorInfo | undefined;
    try {
      out = product({ ...args, inputs: { a: a!, b: b! } });
    } catch {
      out = undefined; // batch shapes that do not broadcast: the wasm kernel reports them
    }
    if (out === undefined) return fallback(args); // a batch broadcast the BLAS product does not take
    const size = out.shape.reduce((p, q) => p * q, 1);
    if (bias === undefined && activation === "linear") return out;
    const heap = new Float32Array(heapBuffer(backend));
    const o = heapOffset(backend, out) / 4;
    const biasAt = bias === undefined ? -1 : heapOffset(backend, bias) / 4;
    const relu = activation === "relu";
    for (let i = 0; i < size; i += n) {
      for (let j = 0; j < n; j++) {
        const v = heap[o + i + j]! + (biasAt < 0 ? 0 : heap[biasAt + j]!);
        heap[o + i + j] = relu && v < 0 ? 0 : v;
      }
    }
    return out;
  };
};

let blasRegistered = false;

/**
 * Replaces Conv2D, FusedConv2D (plain form), Conv2DBackpropFilter,
 * Conv2DBackpropInput, BatchMatMul and _FusedMatMul on wasm by the native versions above,
 * each keeping the kernel registered before as its fallback. Returns whether
 * OpenBLAS was found (nothing is replaced when it was not).
 */
export const registerNativeKernels = (): boolean => {
  if (blasRegistered) return true;
  const blas = loadBlas();
  if (blas === undefined) return false;
  const scratch = new Scratch();
  const replace = (name: string, make: (fallback: KernelFunc) => KernelFunc) => {
    const original = tf.getKernel(name, "wasm");
    if (original === undefined) return;
    tf.unregisterKernel(name, "wasm");
    tf.registerKernel({
      kernelName: name,
      backendName: "wasm",
      setupFunc: original.setupFunc,
      kernelFunc: make(original.kernelFunc as unknown as KernelFunc) as unknown as tf.KernelFunc,
    });
  };
  replace("Conv2D", (fallback) => blasConv2D(blas, scratch, fallback, false));
  replace("FusedConv2D", (fallback) => blasConv2D(blas, scratch, fallback, true));
  replace("Conv2DBackpropFilter", (fallback) => blasConv2DBackpropFilter(blas, scratch, fallback));
  replace("Conv2DBackpropInput", (fallback) => blasConv2DBackpropInput(blas, scratch, fallback));
  replace("BatchMatMul", (fallback) => blasBatchMatMul(blas.sgemm, fallback));
  replace("_FusedMatMul", (fallback) => blasFusedMatMul(blas.sgemm, fallback));
  blasRegistered = true;
  return true;
};
