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
 */
import * as tf from "@tensorflow/tfjs";

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

/** Registers the wasm kernels TF.js lacks; safe to call more than once. */
export const registerWasmKernels = (): void => {
  if (tf.getKernel("Conv2DBackpropFilter", "wasm") !== undefined) return;
  tf.registerKernel({
    kernelName: "Conv2DBackpropFilter",
    backendName: "wasm",
    kernelFunc: conv2DBackpropFilterVia("wasm") as unknown as tf.KernelFunc,
  });
};
