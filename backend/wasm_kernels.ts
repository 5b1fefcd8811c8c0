/**
 * Kernels the TF.js wasm backend lacks, in plain wasm (no native library),
 * registered when the backend starts. The OpenBLAS / oneDNN kernels
 * (backend/native_kernels.ts) go on top of these, falling back to them.
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
import { kernelInvariant } from "./invariant.ts";
import { activeKernelSettings } from "./kernel_settings.ts";
import { heapView, type WasmBackendLike } from "./wasm_heap.ts";

type TensorInfo = tf.TensorInfo;
/** The arguments TF.js passes a kernel function. */
export interface KernelArgs {
  inputs: Record<string, TensorInfo>;
  backend: tf.KernelBackend;
  attrs?: Record<string, unknown>;
}
// The kernel functions of one backend, called directly (not through the engine,
// so nothing is recorded on a gradient tape and intermediates are ours to free).
export type KernelFunc = (args: KernelArgs) => TensorInfo;

const kernel = (name: string, backendName: string): KernelFunc => {
  const config = tf.getKernel(name, backendName);
  kernelInvariant(config !== undefined, () => `kernel ${name} is not registered for backend ${backendName}`);
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
  const fill = kernel("Fill", backendName);
  return (args: KernelArgs): TensorInfo => {
    const { inputs, backend } = args;
    const attrs = args.attrs as unknown as tf.Conv2DBackpropFilterAttrs & {
      dilations?: number | [number, number];
    };
    const x = inputs["x"]!;
    const dy = inputs["dy"]!;
    kernelInvariant(
      attrs.dataFormat === undefined || attrs.dataFormat === "NHWC",
      () => `Conv2DBackpropFilter on ${backendName}: only NHWC is supported, got ${attrs.dataFormat}`,
    );
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
    // The swapped convolution would need stride and dilation > 1 together,
    // which XNNPACK's path here does not take; TF.js never asks for it
    // (conv2d's gradient requires dilation 1).
    kernelInvariant(
      !(strided && dilated),
      () => "Conv2DBackpropFilter: strides and dilations both > 1 are not supported",
    );
    const plan = planFilterGrad(convInfo);
    if (plan.keepHeight <= 0 || plan.keepWidth <= 0) {
      // Along one axis every filter tap falls in the padding (a 1x1 filter with padding and a stride
      // larger than the input, say): the input never meets the filter, so its gradient is 0. The
      // swapped convolution would get an empty input, which XNNPACK rejects.
      return fill({
        inputs: {},
        backend,
        attrs: { shape: [...attrs.filterShape], value: 0, dtype: "float32" },
      });
    }
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

const conv2DBackpropInputVia = (original: tf.KernelConfig | undefined) => {
  const fallback = (args: KernelArgs): TensorInfo => {
    kernelInvariant(original !== undefined, () => "Conv2DBackpropInput: no fallback kernel");
    return (original.kernelFunc as unknown as KernelFunc)(args);
  };
  const conv2D = kernel("Conv2D", "wasm");
  const slice = kernel("Slice", "wasm");
  const reshape = kernel("Reshape", "wasm");
  const transpose = kernel("Transpose", "wasm");
  return (args: KernelArgs): TensorInfo => {
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
    const fast = activeKernelSettings().fastConv2DBackpropInput &&
      convInfo.dataFormat === "channelsLast" && convInfo.strideHeight === convInfo.strideWidth;
    if (!fast) {
      return fallback(args);
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
      return fallback(args);
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
 * Identity shares its input's data (as Reshape does, and as the cpu backend's
 * Identity does) instead of copying it. The engine clones every tensor a kernel
 * saves for its gradient (`saveTensorsForBackwardMode`), so tfjs-backend-wasm's
 * copying Identity doubled the memory the gradient tape holds and cost ~500
 * copies a training step. Sharing is safe because no kernel writes into its inputs.
 */
const sharingIdentity = (args: KernelArgs): TensorInfo => {
  const x = args.inputs.x!;
  const backend = args.backend as unknown as { incRef(dataId: object): void };
  backend.incRef(x.dataId);
  return { dataId: x.dataId, shape: [...x.shape], dtype: x.dtype };
};

/**
 * Registers the wasm kernels TF.js lacks or runs slowly; safe to call more than
 * once. Call before `tf.setBackend("wasm")` (the backend runs kernel set-up
 * functions when it starts; the replaced Conv2DBackpropInput's set-up is kept
 * so the original stays usable as a fallback).
 */
export const registerPlainWasmKernels = (): void => {
  if (tf.getKernel("Conv2DBackpropFilter", "wasm") !== undefined) return;
  const identity = tf.getKernel("Identity", "wasm");
  if (identity !== undefined) tf.unregisterKernel("Identity", "wasm");
  tf.registerKernel({
    kernelName: "Identity",
    backendName: "wasm",
    kernelFunc: ((args: KernelArgs) =>
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
    kernelFunc: ((args: KernelArgs) => {
      impl ??= conv2DBackpropInputVia(original);
      return impl(args);
    }) as unknown as tf.KernelFunc,
  });
};
