/**
 * Kernels the TF.js wasm backend lacks, registered when the backend starts.
 *
 * `Conv2DBackpropFilter` (the gradient of a convolution with respect to its
 * filter) is missing from tfjs-backend-wasm 4.22, so training any convolutional
 * model there fails. It is a correlation of the input with the output gradient:
 *
 *   dW[kh, kw, ci, co] = Σ_{n, oh, ow} x[n, oh·s + kh·d − padTop, ow·s + kw·d − padLeft, ci] · dy[n, oh, ow, co]
 *
 * which is exactly a forward convolution once batch and channel axes are
 * swapped: input x' = xᵀ [Ci, H, W, N] (batch axis = input channels, channel
 * axis = batch), filter dy' [OH, OW, N, Co], stride d, dilation s. The result
 * [Ci, KH, KW, Co] is transposed back to [KH, KW, Ci, Co]. The heavy work thus
 * runs in the backend's own (XNNPACK) convolution.
 *
 * `Conv2DBackpropInput` (the gradient with respect to the input) exists in
 * tfjs-backend-wasm but is a naive scalar loop, ~10x slower than XNNPACK; it is
 * replaced by a forward convolution too (see `planInputGrad`).
 */
import * as tf from "@tensorflow/tfjs";
import {
  type Blas,
  blasEnabled,
  type Dnnl,
  type DnnlConvShape,
  type DnnlDirection,
  loadBlas,
  loadDnnl,
  pointerAt,
  Scratch,
} from "./blas.ts";

type TensorInfo = tf.TensorInfo;
// The kernel functions of one backend, called directly (not through the engine,
// so nothing is recorded on a gradient tape and intermediates are ours to free).
type KernelFunc = (args: {
  inputs: Record<string, TensorInfo>;
  backend: tf.KernelBackend;
  attrs?: Record<string, unknown>;
}) => TensorInfo;

const kernel = (name: string, backendName: string): KernelFunc => {
  const config = tf.getKernel(name, backendName);
  if (config === undefined) throw new Error(`kernel ${name} is not registered for backend ${backendName}`);
  return config.kernelFunc as unknown as KernelFunc;
};

/** Geometry of the filter gradient expressed as a forward convolution over swapped axes. */
export interface FilterGradPlan {
  /** Rows/columns of x to keep (a stride can leave trailing rows unread). */
  readonly keepHeight: number;
  readonly keepWidth: number;
  /** Explicit padding of the swapped convolution. */
  readonly pad: [[number, number], [number, number], [number, number], [number, number]];
}

/**
 * Plans the swapped convolution so that it produces exactly KH x KW outputs.
 * The padded extent it needs is (K−1)·d + (O−1)·s + 1 per axis; the forward
 * pass may have padded more (or read less, when the stride skips the last rows),
 * so the far padding is recomputed and, where negative, the input is cropped.
 */
export const planFilterGrad = (
  convInfo: tf.backend_util.Conv2DInfo,
): FilterGradPlan => {
  const axis = (
    inSize: number,
    filter: number,
    dilation: number,
    out: number,
    stride: number,
    near: number,
  ) => {
    const extent = (filter - 1) * dilation + (out - 1) * stride + 1;
    const far = extent - inSize - near;
    return far >= 0 ? { keep: inSize, far } : { keep: inSize + far, far: 0 };
  };
  const h = axis(
    convInfo.inHeight,
    convInfo.filterHeight,
    convInfo.dilationHeight,
    convInfo.outHeight,
    convInfo.strideHeight,
    convInfo.padInfo.top,
  );
  const w = axis(
    convInfo.inWidth,
    convInfo.filterWidth,
    convInfo.dilationWidth,
    convInfo.outWidth,
    convInfo.strideWidth,
    convInfo.padInfo.left,
  );
  return {
    keepHeight: h.keep,
    keepWidth: w.keep,
    pad: [[0, 0], [convInfo.padInfo.top, h.far], [convInfo.padInfo.left, w.far], [0, 0]],
  };
};

const conv2DBackpropFilterVia = (backendName: string) => {
  const transpose = kernel("Transpose", backendName);
  const slice = kernel("Slice", backendName);
  const conv2D = kernel("Conv2D", backendName);
  return (args: {
    inputs: Record<string, TensorInfo>;
    backend: tf.KernelBackend;
    attrs?: Record<string, unknown>;
  }): TensorInfo => {
    const { inputs, backend } = args;
    const attrs = args.attrs as unknown as tf.Conv2DBackpropFilterAttrs & {
      dilations?: number | [number, number];
    };
    const x = inputs["x"]!;
    const dy = inputs["dy"]!;
    if (attrs.dataFormat !== undefined && attrs.dataFormat !== "NHWC") {
      throw new Error(
        `Conv2DBackpropFilter on ${backendName}: only NHWC is supported, got ${attrs.dataFormat}`,
      );
    }
    const dilations = attrs.dilations ?? 1;
    const convInfo = tf.backend_util.computeConv2DInfo(
      x.shape as [number, number, number, number],
      attrs.filterShape as [number, number, number, number],
      attrs.strides,
      dilations,
      attrs.pad,
      attrs.dimRoundingMode,
    );
    const strided = convInfo.strideHeight > 1 || convInfo.strideWidth > 1;
    const dilated = convInfo.dilationHeight > 1 || convInfo.dilationWidth > 1;
    if (strided && dilated) {
      // The swapped convolution would need stride and dilation > 1 together,
      // which XNNPACK's path here does not take; TF.js never asks for it
      // (conv2d's gradient requires dilation 1).
      throw new Error("Conv2DBackpropFilter: strides and dilations both > 1 are not supported");
    }
    const plan = planFilterGrad(convInfo);
    const temporaries: TensorInfo[] = [];
    const keep = (info: TensorInfo) => {
      temporaries.push(info);
      return info;
    };
    try {
      let input = x;
      if (plan.keepHeight < convInfo.inHeight || plan.keepWidth < convInfo.inWidth) {
        input = keep(slice({
          inputs: { x },
          backend,
          attrs: { begin: [0, 0, 0, 0], size: [x.shape[0], plan.keepHeight, plan.keepWidth, x.shape[3]] },
        }));
      }
      const xSwapped = keep(transpose({ inputs: { x: input }, backend, attrs: { perm: [3, 1, 2, 0] } }));
      const dySwapped = keep(transpose({ inputs: { x: dy }, backend, attrs: { perm: [1, 2, 0, 3] } }));
      const grad = keep(conv2D({
        inputs: { x: xSwapped, filter: dySwapped },
        backend,
        attrs: {
          strides: [convInfo.dilationHeight, convInfo.dilationWidth],
          dilations: [convInfo.strideHeight, convInfo.strideWidth],
          pad: plan.pad,
          dataFormat: "NHWC",
        },
      }));
      return transpose({ inputs: { x: grad }, backend, attrs: { perm: [1, 2, 0, 3] } });
    } finally {
      for (const info of temporaries) backend.disposeData(info.dataId);
    }
  };
};

/**
 * One spatial axis of the input gradient as a stride-1 forward convolution
 * (polyphase form). With stride s, input row i = p + s·a (phase p ∈ [0, s))
 * receives dy[o]·W[k] exactly when o·s + k − padNear = i, i.e. for the taps
 * k ≡ p + padNear (mod s). Phase p therefore is a stride-1 correlation of dy
 * with its own sub-filter W[r_p + s·j] (j = 0 … J_p − 1, reversed), and all s
 * phases share one window of `taps` rows of dy starting at a − `near`:
 *
 *   dxPhase_p[a] = Σ_t dy[a − near + t] · W[tapIndex[p][t]]   (tapIndex −1: zero)
 *
 * Stacking the phases on the channel axis makes one convolution whose output
 * [.., ceil(in/s), .., s·s·Ci] a depth-to-space shuffle interleaves back into dx. No work is
 * spent on inserted zeros (unlike dilating dy); the only waste is the zero taps
 * where phases have fewer taps than `taps` (at most ⌈K/s⌉ vs. ⌊K/s⌋).
 */
export interface InputGradAxis {
  /** Zero rows before dy (negative: rows of dy to drop at the start). */
  readonly near: number;
  /** Zero rows after dy (negative: rows of dy to drop at the end). */
  readonly far: number;
  /** Filter extent of the stride-1 convolution. */
  readonly taps: number;
  /** Output rows per phase: ceil(in / stride); the last phase may produce one surplus row, cropped. */
  readonly outPerPhase: number;
  /** tapIndex[p][t]: the forward filter row used by phase p at tap t, or −1. */
  readonly tapIndex: readonly (readonly number[])[];
}

export const planInputGradAxis = (
  inSize: number,
  outSize: number,
  filter: number,
  stride: number,
  padNear: number,
): InputGradAxis => {
  // Phase p: remainder r, offset q with p + padNear = q·s + r; taps k = r + s·j read dy[a + q − j].
  const phases = Array.from({ length: stride }, (_, p) => {
    const r = (p + padNear) % stride;
    const q = (p + padNear - r) / stride;
    const count = Math.max(0, Math.ceil((filter - r) / stride));
    return { r, q, count };
  });
  const used = phases.filter((ph) => ph.count > 0);
  // Tap t reads dy[a − near + t] = dy[a + q − j], so t = near + q − j ≥ 0.
  const near = Math.max(...used.map((ph) => ph.count - 1 - ph.q));
  const taps = Math.max(...used.map((ph) => near + ph.q)) + 1;
  const tapIndex = phases.map((ph) => {
    const row = new Array<number>(taps).fill(-1);
    for (let j = 0; j < ph.count; j++) row[near + ph.q - j] = ph.r + stride * j;
    return row;
  });
  const outPerPhase = Math.ceil(inSize / stride);
  // The stride-1 convolution yields (near + outSize + far) − taps + 1 rows.
  const far = outPerPhase + taps - 1 - outSize - near;
  return { near, far, taps, outPerPhase, tapIndex };
};

/** Options of the replacement kernels (for benchmarks and tests that compare against TF.js's own). */
export const wasmKernelOptions = {
  /** false: use tfjs-backend-wasm's own (naive loop) Conv2DBackpropInput. */
  fastConv2DBackpropInput: true,
};

interface WasmBackendLike extends tf.KernelBackend {
  readonly wasm: { readonly HEAPF32: Float32Array };
  readonly dataIdMap: { get(dataId: object): { memoryOffset: number } };
  makeOutput(shape: number[], dtype: "float32"): TensorInfo;
}

/** A float32 view of a tensor's data on the wasm heap (valid until the next allocation). */
const heapView = (backend: WasmBackendLike, info: TensorInfo): Float32Array => {
  const size = info.shape.reduce((a, b) => a * b, 1);
  return new Float32Array(backend.wasm.HEAPF32.buffer, backend.dataIdMap.get(info.dataId).memoryOffset, size);
};

const conv2DBackpropInputVia = (original: tf.KernelConfig | undefined) => {
  const conv2D = kernel("Conv2D", "wasm");
  const slice = kernel("Slice", "wasm");
  const reshape = kernel("Reshape", "wasm");
  const transpose = kernel("Transpose", "wasm");
  return (args: {
    inputs: Record<string, TensorInfo>;
    backend: tf.KernelBackend;
    attrs?: Record<string, unknown>;
  }): TensorInfo => {
    const backend = args.backend as WasmBackendLike;
    const attrs = args.attrs as unknown as tf.Conv2DBackpropInputAttrs;
    const dy = args.inputs["dy"]!;
    const filter = args.inputs["filter"]!;
    const convInfo = tf.backend_util.computeConv2DInfo(
      attrs.inputShape as [number, number, number, number],
      filter.shape as [number, number, number, number],
      attrs.strides,
      1,
      attrs.pad,
      attrs.dimRoundingMode,
      false,
      tf.backend_util.convertConv2DDataFormat(attrs.dataFormat),
    );
    const fast = wasmKernelOptions.fastConv2DBackpropInput &&
      convInfo.dataFormat === "channelsLast" && convInfo.strideHeight === convInfo.strideWidth;
    if (!fast) {
      if (original === undefined) throw new Error("Conv2DBackpropInput: no fallback kernel");
      return (original.kernelFunc as unknown as KernelFunc)(args);
    }
    const stride = convInfo.strideHeight;
    const h = planInputGradAxis(
      convInfo.inHeight,
      convInfo.outHeight,
      convInfo.filterHeight,
      stride,
      convInfo.padInfo.top,
    );
    const w = planInputGradAxis(
      convInfo.inWidth,
      convInfo.outWidth,
      convInfo.filterWidth,
      stride,
      convInfo.padInfo.left,
    );
    if (h.near < 0 || h.far < 0 || w.near < 0 || w.far < 0) {
      // Padding wider than the filter's reach on a strided axis (e.g. a 1x1 filter, stride 3, pad 1):
      // the plan would need negative padding. Rare, and never in a ResNet: take the original kernel.
      if (original === undefined) throw new Error("Conv2DBackpropInput: no fallback kernel");
      return (original.kernelFunc as unknown as KernelFunc)(args);
    }
    const [batch, inH, inW, inC] = [
      convInfo.batchSize,
      convInfo.inHeight,
      convInfo.inWidth,
      convInfo.inChannels,
    ];
    const outC = convInfo.outChannels;
    const phases = stride * stride;
    const temporaries: TensorInfo[] = [];
    const keep = (info: TensorInfo) => {
      temporaries.push(info);
      return info;
    };
    try {
      // Phase filter [taps, taps, Co, s·s·Ci]: rotated, in/out swapped, phases stacked on the out axis.
      const phaseFilter = keep(backend.makeOutput([h.taps, w.taps, outC, phases * inC], "float32"));
      const f = heapView(backend, phaseFilter);
      const src = heapView(backend, filter);
      f.fill(0);
      const kw = convInfo.filterWidth;
      const stackedC = phases * inC;
      for (let ph = 0; ph < stride; ph++) {
        for (let pw = 0; pw < stride; pw++) {
          const channelBase = (ph * stride + pw) * inC;
          for (let th = 0; th < h.taps; th++) {
            const kh = h.tapIndex[ph]![th]!;
            if (kh < 0) continue;
            for (let tw = 0; tw < w.taps; tw++) {
              const kwi = w.tapIndex[pw]![tw]!;
              if (kwi < 0) continue;
              const srcBase = (kh * kw + kwi) * inC * outC;
              const dstBase = (th * w.taps + tw) * outC * stackedC + channelBase;
              for (let ci = 0; ci < inC; ci++) {
                for (let co = 0; co < outC; co++) {
                  f[dstBase + co * stackedC + ci] = src[srcBase + ci * outC + co]!;
                }
              }
            }
          }
        }
      }
      // Negative padding = rows/columns of dy that no output reads.
      let input = dy;
      const cropTop = Math.max(0, -h.near);
      const cropLeft = Math.max(0, -w.near);
      const keepH = convInfo.outHeight - cropTop - Math.max(0, -h.far);
      const keepW = convInfo.outWidth - cropLeft - Math.max(0, -w.far);
      if (keepH !== convInfo.outHeight || keepW !== convInfo.outWidth) {
        input = keep(slice({
          inputs: { x: dy },
          backend,
          attrs: { begin: [0, cropTop, cropLeft, 0], size: [batch, keepH, keepW, outC] },
        }));
      }
      const stacked = conv2D({
        inputs: { x: input, filter: phaseFilter },
        backend,
        attrs: {
          strides: 1,
          dilations: 1,
          pad: [
            [0, 0],
            [Math.max(0, h.near), Math.max(0, h.far)],
            [Math.max(0, w.near), Math.max(0, w.far)],
            [
              0,
              0,
            ],
          ],
          dataFormat: "NHWC",
        },
      });
      let dx = stacked;
      if (stride > 1) {
        // Interleave the phases: [N, A, B, s, s, Ci] -> [N, A, s, B, s, Ci]. A reshape-transpose
        // measured ~3x faster than tfjs-backend-wasm's DepthToSpace for this layout.
        keep(stacked);
        const [, a, b] = stacked.shape as [number, number, number, number];
        const split = keep(reshape({
          inputs: { x: stacked },
          backend,
          attrs: { shape: [batch, a, b, stride, stride, inC] },
        }));
        const interleaved = keep(
          transpose({ inputs: { x: split }, backend, attrs: { perm: [0, 1, 3, 2, 4, 5] } }),
        );
        dx = reshape({
          inputs: { x: interleaved },
          backend,
          attrs: { shape: [batch, a * stride, b * stride, inC] },
        });
      }
      if (dx.shape[1] === inH && dx.shape[2] === inW) return dx;
      keep(dx);
      return slice({
        inputs: { x: dx },
        backend,
        attrs: { begin: [0, 0, 0, 0], size: [batch, inH, inW, inC] },
      });
    } finally {
      for (const info of temporaries) backend.disposeData(info.dataId);
    }
  };
};

/**
 * Registers the wasm kernels TF.js lacks or runs slowly; safe to call more than
 * once. Call before `tf.setBackend("wasm")` (the backend runs kernel set-up
 * functions when it starts; the replaced Conv2DBackpropInput's set-up is kept
 * so the original stays usable as a fallback).
 */
export const registerWasmKernels = (): void => {
  if (tf.getKernel("Conv2DBackpropFilter", "wasm") !== undefined) return;
  registerPlainWasmKernels();
  // OpenBLAS kernels go on top, each falling back to the kernel above when BLAS is off.
  registerBlasKernels();
  registerNativeBatchNorm();
};

/**
 * Identity shares its input's data (as Reshape does, and as the cpu backend's
 * Identity does) instead of copying it. The engine clones every tensor a kernel
 * saves for its gradient (`saveTensorsForBackwardMode`), so tfjs-backend-wasm's
 * copying Identity doubled the memory the gradient tape holds and cost ~500
 * copies a training step. Sharing is safe because no kernel writes into its inputs.
 */
const sharingIdentity = (args: Parameters<KernelFunc>[0]): TensorInfo => {
  const x = args.inputs.x!;
  const backend = args.backend as unknown as { incRef(dataId: object): void };
  backend.incRef(x.dataId);
  return { dataId: x.dataId, shape: [...x.shape], dtype: x.dtype };
};

const registerPlainWasmKernels = (): void => {
  const identity = tf.getKernel("Identity", "wasm");
  if (identity !== undefined) tf.unregisterKernel("Identity", "wasm");
  tf.registerKernel({
    kernelName: "Identity",
    backendName: "wasm",
    kernelFunc: ((args: Parameters<KernelFunc>[0]) =>
      args.inputs.x!.dtype === "string"
        ? (identity!.kernelFunc as unknown as KernelFunc)(args)
        : sharingIdentity(args)) as unknown as tf.KernelFunc,
  });
  tf.registerKernel({
    kernelName: "Conv2DBackpropFilter",
    backendName: "wasm",
    kernelFunc: conv2DBackpropFilterVia("wasm") as unknown as tf.KernelFunc,
  });
  const original = tf.getKernel("Conv2DBackpropInput", "wasm");
  if (original !== undefined) tf.unregisterKernel("Conv2DBackpropInput", "wasm");
  let impl: KernelFunc | undefined;
  tf.registerKernel({
    kernelName: "Conv2DBackpropInput",
    backendName: "wasm",
    setupFunc: original?.setupFunc,
    // Resolved lazily: the kernels it calls are registered by the wasm package's import.
    kernelFunc: ((args: Parameters<KernelFunc>[0]) => {
      impl ??= conv2DBackpropInputVia(original);
      return impl(args);
    }) as unknown as tf.KernelFunc,
  });
};

// ---------------------------------------------------------------------------
// OpenBLAS-backed kernels (backend/blas.ts), registered when the library loads.
//
// Convolutions run as im2col + sgemm, in chunks of images so the column buffer
// (JS memory, reused) stays a few MB whatever the batch:
//
//   Conv2D                out[rows, Co]  = col[rows, K] · W[K, Co]              (K = KH·KW·Ci)
//   Conv2DBackpropFilter  dW[K, Co]     += col[rows, K]ᵀ · dy[rows, Co]         (summed over chunks)
//   Conv2DBackpropInput   dcol[rows, K]  = dy[rows, Co] · W[K, Co]ᵀ, then col2im (scatter-add)
//
// A 1x1, stride-1, unpadded convolution needs no column buffer: x itself is
// col. Tensors are read and written in place on the wasm heap (zero-copy).
// Anything else (NCHW, dtype other than float32, BLAS disabled) goes to the
// kernel registered before.
// ---------------------------------------------------------------------------

/** Which BLAS kernels run (all on by default when OpenBLAS loads); for benchmarks and exactness tests. */
export const blasKernelOptions = {
  conv2D: true,
  conv2DBackpropFilter: true,
  conv2DBackpropInput: true,
  batchMatMul: true,
  /** Convolutions through oneDNN (libdnnl2) first, where it loads; im2col + OpenBLAS otherwise. */
  dnnl: true,
  /** Training-mode batch norm (+ ReLU) through oneDNN where it loads; wasm tensor ops otherwise. */
  batchNorm: true,
  /**
   * Conv2D and Conv2DBackpropInput use BLAS only where the column width
   * KH·KW·Ci is at least this (1x1 stride-1 convolutions, which need no column
   * buffer, always do): for thin inputs the JS im2col/col2im copies cost more
   * than XNNPACK's whole convolution. The filter gradient always gains.
   */
  minColumns: 256,
  /** Floats of im2col buffer per chunk. */
  chunkFloats: 1 << 22,
};

/** Convolution geometry in NHWC (the oneDNN shape without its far paddings). */
type ConvGeometry = Omit<DnnlConvShape, "bottom" | "right">;

const geometry = (c: tf.backend_util.Conv2DInfo): ConvGeometry => ({
  n: c.batchSize,
  h: c.inHeight,
  w: c.inWidth,
  ci: c.inChannels,
  oh: c.outHeight,
  ow: c.outWidth,
  co: c.outChannels,
  kh: c.filterHeight,
  kw: c.filterWidth,
  sh: c.strideHeight,
  sw: c.strideWidth,
  dh: c.dilationHeight,
  dw: c.dilationWidth,
  top: c.padInfo.top,
  left: c.padInfo.left,
});

/** x itself is the column matrix: 1x1 filter, stride 1, no padding. */
const isPointwise = (g: ConvGeometry) =>
  g.kh === 1 && g.kw === 1 && g.sh === 1 && g.sw === 1 && g.top === 0 && g.left === 0 &&
  g.oh === g.h && g.ow === g.w;

/** Images per chunk so that a chunk's column buffer holds at most `chunkFloats`. */
const imagesPerChunk = (g: ConvGeometry) =>
  Math.max(1, Math.min(g.n, Math.floor(blasKernelOptions.chunkFloats / (g.oh * g.ow * g.kh * g.kw * g.ci))));

/**
 * Column rows of images [n0, n1): row ((n − n0)·OH + oh)·OW + ow, column (kh·KW + kw)·Ci + ci.
 * Where a filter row lies wholly inside the image (dilation 1), its KW·Ci values
 * are one contiguous stretch of x, copied in one loop (the common case).
 */
export const im2col = (x: Float32Array, g: ConvGeometry, n0: number, n1: number, col: Float32Array): void => {
  const { h, w, ci, oh, ow, kh, kw, sh, sw, dh, dw, top, left } = g;
  const k = kh * kw * ci;
  const span = kw * ci;
  const dense = dw === 1;
  let dst = 0;
  for (let n = n0; n < n1; n++) {
    const base = n * h * w * ci;
    for (let y = 0; y < oh; y++) {
      for (let xo = 0; xo < ow; xo++) {
        const iw0 = xo * sw - left;
        const inside = dense && iw0 >= 0 && iw0 + kw <= w;
        for (let i = 0; i < kh; i++) {
          const ih = y * sh - top + i * dh;
          let d = dst + i * span;
          if (ih < 0 || ih >= h) {
            col.fill(0, d, d + span);
            continue;
          }
          const rowBase = base + ih * w * ci;
          if (inside) {
            const s = rowBase + iw0 * ci;
            for (let c = 0; c < span; c++) col[d + c] = x[s + c]!;
            continue;
          }
          for (let j = 0; j < kw; j++, d += ci) {
            const iw = iw0 + j * dw;
            if (iw < 0 || iw >= w) {
              for (let c = 0; c < ci; c++) col[d + c] = 0;
              continue;
            }
            const s = rowBase + iw * ci;
            for (let c = 0; c < ci; c++) col[d + c] = x[s + c]!;
          }
        }
        dst += k;
      }
    }
  }
};

/** The adjoint of im2col: adds the column rows of images [n0, n1) into dx (which the caller zeroed). */
export const col2imAdd = (
  col: Float32Array,
  g: ConvGeometry,
  n0: number,
  n1: number,
  dx: Float32Array,
): void => {
  const { h, w, ci, oh, ow, kh, kw, sh, sw, dh, dw, top, left } = g;
  const k = kh * kw * ci;
  const span = kw * ci;
  const dense = dw === 1;
  let src = 0;
  for (let n = n0; n < n1; n++) {
    const base = n * h * w * ci;
    for (let y = 0; y < oh; y++) {
      for (let xo = 0; xo < ow; xo++) {
        const iw0 = xo * sw - left;
        const inside = dense && iw0 >= 0 && iw0 + kw <= w;
        for (let i = 0; i < kh; i++) {
          const ih = y * sh - top + i * dh;
          if (ih < 0 || ih >= h) continue;
          const rowBase = base + ih * w * ci;
          let s = src + i * span;
          if (inside) {
            const d = rowBase + iw0 * ci;
            for (let c = 0; c < span; c++) dx[d + c] += col[s + c]!;
            continue;
          }
          for (let j = 0; j < kw; j++, s += ci) {
            const iw = iw0 + j * dw;
            if (iw < 0 || iw >= w) continue;
            const d = rowBase + iw * ci;
            for (let c = 0; c < ci; c++) dx[d + c] += col[s + c]!;
          }
        }
        src += k;
      }
    }
  }
};

/** Byte offset of a tensor on the wasm heap. */
const offsetOf = (backend: WasmBackendLike, info: TensorInfo): number =>
  backend.dataIdMap.get(info.dataId).memoryOffset;

type Sgemm = Blas["sgemm"];

const dnnlShape = (c: tf.backend_util.Conv2DInfo): DnnlConvShape => ({
  ...geometry(c),
  bottom: c.padInfo.bottom,
  right: c.padInfo.right,
});

/**
 * Runs the convolution through oneDNN into a fresh output of `outShape`;
 * undefined when oneDNN is off or refuses the shape (nothing allocated then).
 * `inputs` are the two operands in the order of `Dnnl.run` for the direction.
 */
const viaDnnl = (
  backend: WasmBackendLike,
  direction: DnnlDirection,
  convInfo: tf.backend_util.Conv2DInfo,
  outShape: number[],
  a: TensorInfo,
  b: TensorInfo,
): TensorInfo | undefined => {
  if (!blasKernelOptions.dnnl) return undefined;
  const dnnl: Dnnl | undefined = loadDnnl();
  if (dnnl === undefined) return undefined;
  const out = backend.makeOutput(outShape, "float32");
  const buffer = backend.wasm.HEAPF32.buffer;
  const p = (info: TensorInfo) => pointerAt(buffer, offsetOf(backend, info));
  // Operand order of Dnnl.run: (x | dx, w | dw, y | dy).
  const ran = direction === "forward"
    ? dnnl.run(direction, dnnlShape(convInfo), p(a), p(b), p(out))
    : direction === "backwardData"
    ? dnnl.run(direction, dnnlShape(convInfo), p(out), p(b), p(a))
    : dnnl.run(direction, dnnlShape(convInfo), p(a), p(out), p(b));
  if (ran) return out;
  backend.disposeData(out.dataId);
  return undefined;
};

/** Geometry of an NHWC convolution from a kernel's shapes and attributes (the native kernels' common start). */
const nhwcConvInfo = (
  inputShape: readonly number[],
  filterShape: readonly number[],
  attrs: {
    strides: number | [number, number];
    dilations?: number | [number, number];
    pad: tf.Conv2DAttrs["pad"];
    dimRoundingMode?: "floor" | "round" | "ceil";
  },
) =>
  tf.backend_util.computeConv2DInfo(
    inputShape as [number, number, number, number],
    filterShape as [number, number, number, number],
    attrs.strides,
    attrs.dilations ?? 1,
    attrs.pad,
    attrs.dimRoundingMode,
  );

/** True unless the kernel was asked for a layout other than NHWC. */
const isNhwc = (dataFormat: string | undefined): boolean => dataFormat === undefined || dataFormat === "NHWC";

const blasConv2D = (
  blas: Blas,
  scratch: Scratch,
  fallback: KernelFunc,
  fused: boolean,
) =>
(args: Parameters<KernelFunc>[0]): TensorInfo => {
  const backend = args.backend as WasmBackendLike;
  const attrs = args.attrs as unknown as tf.Conv2DAttrs & { activation?: string };
  const x = args.inputs["x"]!;
  const filter = args.inputs["filter"]!;
  // FusedConv2D with bias/activation/preluActivationWeights is left to XNNPACK.
  const plain = !fused ||
    ((attrs.activation === undefined || attrs.activation === "linear") && args.inputs["bias"] === undefined &&
      args.inputs["preluActivationWeights"] === undefined);
  if (
    !blasEnabled() || !blasKernelOptions.conv2D || !plain || x.dtype !== "float32" ||
    !isNhwc(attrs.dataFormat)
  ) return fallback(args);
  const convInfo = nhwcConvInfo(x.shape, filter.shape, attrs);
  const g = geometry(convInfo);
  if (g.n * g.oh * g.ow * g.co > 0) {
    const viaOneDnn = viaDnnl(backend, "forward", convInfo, convInfo.outShape, x, filter);
    if (viaOneDnn !== undefined) return viaOneDnn;
  }
  // XNNPACK (tfjs-backend-wasm 4.22) returns wrong values when the stride exceeds the filter
  // extent with 'same' padding (e.g. 2x2 filter, stride 3): those always take this kernel.
  const strideBeyondFilter = g.sh > (g.kh - 1) * g.dh + 1 || g.sw > (g.kw - 1) * g.dw + 1;
  if (!isPointwise(g) && !strideBeyondFilter && g.kh * g.kw * g.ci < blasKernelOptions.minColumns) {
    return fallback(args);
  }
  const out = backend.makeOutput(convInfo.outShape, "float32");
  if (g.n * g.oh * g.ow * g.co === 0) return out;
  const k = g.kh * g.kw * g.ci;
  const buffer = backend.wasm.HEAPF32.buffer;
  const xOff = offsetOf(backend, x);
  const outOff = offsetOf(backend, out);
  const wPtr = pointerAt(buffer, offsetOf(backend, filter));
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
  const per = imagesPerChunk(g);
  const rowsPerImage = g.oh * g.ow;
  const col = scratch.get(per * rowsPerImage * k);
  const colPtr = Deno.UnsafePointer.of(col);
  for (let n0 = 0; n0 < g.n; n0 += per) {
    const n1 = Math.min(g.n, n0 + per);
    im2col(xs, g, n0, n1, col);
    const rows = (n1 - n0) * rowsPerImage;
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
      pointerAt(buffer, outOff + n0 * rowsPerImage * g.co * 4),
      g.co,
    );
  }
  return out;
};

const blasConv2DBackpropFilter =
  (blas: Blas, scratch: Scratch, fallback: KernelFunc) => (args: Parameters<KernelFunc>[0]): TensorInfo => {
    const backend = args.backend as WasmBackendLike;
    const attrs = args.attrs as unknown as tf.Conv2DBackpropFilterAttrs & {
      dilations?: number | [number, number];
    };
    const x = args.inputs["x"]!;
    const dy = args.inputs["dy"]!;
    if (
      !blasEnabled() || !blasKernelOptions.conv2DBackpropFilter || x.dtype !== "float32" ||
      !isNhwc(attrs.dataFormat)
    ) return fallback(args);
    const convInfo = nhwcConvInfo(x.shape, attrs.filterShape, attrs);
    const g = geometry(convInfo);
    const k = g.kh * g.kw * g.ci;
    if (g.n * g.oh * g.ow > 0) {
      // (x, dy) -> dW
      const viaOneDnn = viaDnnl(backend, "backwardWeights", convInfo, [...attrs.filterShape], x, dy);
      if (viaOneDnn !== undefined) return viaOneDnn;
    }
    const out = backend.makeOutput([...attrs.filterShape], "float32");
    const buffer = backend.wasm.HEAPF32.buffer;
    const dwPtr = pointerAt(buffer, offsetOf(backend, out));
    const xOff = offsetOf(backend, x);
    const dyOff = offsetOf(backend, dy);
    if (g.n * g.oh * g.ow === 0) {
      new Float32Array(buffer, offsetOf(backend, out), k * g.co).fill(0);
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
    const per = imagesPerChunk(g);
    const rowsPerImage = g.oh * g.ow;
    const col = scratch.get(per * rowsPerImage * k);
    const colPtr = Deno.UnsafePointer.of(col);
    for (let n0 = 0; n0 < g.n; n0 += per) {
      const n1 = Math.min(g.n, n0 + per);
      im2col(xs, g, n0, n1, col);
      blas.sgemm(
        true,
        false,
        k,
        g.co,
        (n1 - n0) * rowsPerImage,
        1,
        colPtr,
        k,
        pointerAt(buffer, dyOff + n0 * rowsPerImage * g.co * 4),
        g.co,
        n0 === 0 ? 0 : 1,
        dwPtr,
        g.co,
      );
    }
    return out;
  };

const blasConv2DBackpropInput =
  (blas: Blas, scratch: Scratch, fallback: KernelFunc) => (args: Parameters<KernelFunc>[0]): TensorInfo => {
    const backend = args.backend as WasmBackendLike;
    const attrs = args.attrs as unknown as tf.Conv2DBackpropInputAttrs & {
      dilations?: number | [number, number];
    };
    const dy = args.inputs["dy"]!;
    const filter = args.inputs["filter"]!;
    if (
      !blasEnabled() || !blasKernelOptions.conv2DBackpropInput || dy.dtype !== "float32" ||
      !isNhwc(attrs.dataFormat)
    ) return fallback(args);
    const convInfo = nhwcConvInfo(attrs.inputShape, filter.shape, attrs);
    const g = geometry(convInfo);
    const k = g.kh * g.kw * g.ci;
    if (g.n * g.oh * g.ow > 0) {
      // (dy, W) -> dx
      const viaOneDnn = viaDnnl(backend, "backwardData", convInfo, [...attrs.inputShape], dy, filter);
      if (viaOneDnn !== undefined) return viaOneDnn;
    }
    if (!isPointwise(g) && k < blasKernelOptions.minColumns) return fallback(args);
    const out = backend.makeOutput([...attrs.inputShape], "float32");
    const buffer = backend.wasm.HEAPF32.buffer;
    const outOff = offsetOf(backend, out);
    const dyOff = offsetOf(backend, dy);
    const wPtr = pointerAt(buffer, offsetOf(backend, filter));
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

const blasBatchMatMul =
  (sgemm: Sgemm, fallback: KernelFunc) => (args: Parameters<KernelFunc>[0]): TensorInfo => {
    const backend = args.backend as WasmBackendLike;
    const attrs = args.attrs as unknown as tf.BatchMatMulAttrs;
    const a = args.inputs["a"]!;
    const b = args.inputs["b"]!;
    if (!blasEnabled() || !blasKernelOptions.batchMatMul || a.dtype !== "float32" || b.dtype !== "float32") {
      return fallback(args);
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
      return fallback(args);
    }
    const out = backend.makeOutput([...outer, m, n], "float32");
    if (m * n * batch === 0) return out;
    const buffer = backend.wasm.HEAPF32.buffer;
    const aOff = offsetOf(backend, a);
    const bOff = offsetOf(backend, b);
    const outOff = offsetOf(backend, out);
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

/**
 * _FusedMatMul (tf.fused.matMul: a product, a bias broadcast over the last
 * axis, an activation) as the sgemm above followed by one pass over the
 * output for the bias [N] and a linear or ReLU activation; other activations
 * and a PReLU weight go to the wasm kernel. (tfjs-backend-wasm 4.22's own
 * kernel adds the bias wrongly when an operand is transposed: test/blas_test.ts.)
 */
const blasFusedMatMul = (sgemm: Sgemm, fallback: KernelFunc) => {
  const product = blasBatchMatMul(sgemm, (args) => {
    throw new Error(
      `_FusedMatMul: no BLAS product for [${args.inputs["a"]!.shape}] x [${args.inputs["b"]!.shape}]`,
    );
  });
  return (args: Parameters<KernelFunc>[0]): TensorInfo => {
    const backend = args.backend as WasmBackendLike;
    const { a, b, bias, preluActivationWeights } = args.inputs;
    const attrs = args.attrs as unknown as tf.BatchMatMulAttrs & { activation?: string };
    const activation = attrs.activation ?? "linear";
    const n = attrs.transposeB ? b!.shape[b!.shape.length - 2]! : b!.shape[b!.shape.length - 1]!;
    const simple = preluActivationWeights === undefined &&
      (activation === "linear" || activation === "relu") &&
      (bias === undefined || (bias.dtype === "float32" && bias.shape.length === 1 && bias.shape[0] === n));
    if (
      !simple || !blasEnabled() || !blasKernelOptions.batchMatMul || a!.dtype !== "float32" ||
      b!.dtype !== "float32"
    ) {
      return fallback(args);
    }
    const ar = a!.shape.length;
    const k = attrs.transposeA ? a!.shape[ar - 2]! : a!.shape[ar - 1]!;
    const kb = attrs.transposeB ? b!.shape[b!.shape.length - 1]! : b!.shape[b!.shape.length - 2]!;
    if (k !== kb) return fallback(args);
    let out: TensorInfo;
    try {
      out = product({ ...args, inputs: { a: a!, b: b! } });
    } catch {
      return fallback(args); // a batch broadcast the BLAS product does not take
    }
    const size = out.shape.reduce((p, q) => p * q, 1);
    if (bias === undefined && activation === "linear") return out;
    const heap = backend.wasm.HEAPF32;
    const o = offsetOf(backend, out) / 4;
    const biasAt = bias === undefined ? -1 : offsetOf(backend, bias) / 4;
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
 * Conv2DBackpropInput, BatchMatMul and _FusedMatMul on wasm by the OpenBLAS versions above,
 * each keeping the kernel registered before as its fallback. Returns whether
 * OpenBLAS was found (nothing is replaced when it was not).
 */
export const registerBlasKernels = (): boolean => {
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

// ---------------------------------------------------------------------------
// Batch normalisation in training mode through oneDNN (backend/batch_norm.ts
// chooses it when `nativeBatchNormActive()`): forward with the statistics and
// an optional fused ReLU, and the backward, each one oneDNN primitive over the
// NHWC activations instead of ~10 (forward) and ~20 (backward) wasm ops.

/** Outputs [y, mean, variance] (+ [workspace] with relu); attrs {epsilon, relu}. */
export const BATCH_NORM_TRAIN = "SwavBatchNormTrain";
/** Inputs {x, mean, variance, gamma, beta, dy} (+ workspace with relu); outputs [dx, dgamma, dbeta]. */
export const BATCH_NORM_TRAIN_GRAD = "SwavBatchNormTrainGrad";

let nativeBatchNormRegistered = false;

/** Whether batch norm runs through oneDNN now: wasm backend, acceleration on, oneDNN loaded. */
export const nativeBatchNormActive = (): boolean =>
  nativeBatchNormRegistered && blasKernelOptions.dnnl && blasKernelOptions.batchNorm &&
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

const registerNativeBatchNorm = (): void => {
  if (nativeBatchNormRegistered || loadDnnl() === undefined) return;
  tf.registerKernel({
    kernelName: BATCH_NORM_TRAIN,
    backendName: "wasm",
    kernelFunc: (({ inputs, backend: b, attrs }: Parameters<KernelFunc>[0]) => {
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
      const buffer = backend.wasm.HEAPF32.buffer; // after every allocation
      const p = (info: TensorInfo) => pointerAt(buffer, offsetOf(backend, info));
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
    kernelFunc: (({ inputs, backend: b, attrs }: Parameters<KernelFunc>[0]) => {
      const backend = b as unknown as WasmBackendLike;
      const { x, mean, variance, gamma, beta, dy, workspace } = inputs as Record<string, TensorInfo>;
      const shape = batchNormShapeOf(x!, attrs as unknown as BatchNormAttrs);
      if (shape.relu && workspace === undefined) {
        throw new Error(`${BATCH_NORM_TRAIN_GRAD}: relu needs the workspace`);
      }
      const dx = backend.makeOutput([...x!.shape], "float32");
      const dgamma = backend.makeOutput([shape.channels], "float32");
      const dbeta = backend.makeOutput([shape.channels], "float32");
      const buffer = backend.wasm.HEAPF32.buffer;
      const p = (info: TensorInfo) => pointerAt(buffer, offsetOf(backend, info));
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
