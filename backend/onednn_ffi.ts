/**
 * The oneDNN (Debian libdnnl2, v2.x C API) symbols and enum values backend/onednn.ts uses.
 */

export const dnnlSymbols = {
  dnnl_engine_create: { parameters: ["pointer", "i32", "usize"], result: "i32" },
  dnnl_stream_create: { parameters: ["pointer", "pointer", "u32"], result: "i32" },
  dnnl_memory_desc_init_by_strides: {
    parameters: ["pointer", "i32", "pointer", "i32", "pointer"],
    result: "i32",
  },
  dnnl_dilated_convolution_forward_desc_init: {
    parameters: [
      "pointer",
      "i32",
      "i32",
      "pointer",
      "pointer",
      "pointer",
      "pointer",
      "pointer",
      "pointer",
      "pointer",
      "pointer",
    ],
    result: "i32",
  },
  dnnl_dilated_convolution_backward_data_desc_init: {
    parameters: [
      "pointer",
      "i32",
      "pointer",
      "pointer",
      "pointer",
      "pointer",
      "pointer",
      "pointer",
      "pointer",
    ],
    result: "i32",
  },
  dnnl_dilated_convolution_backward_weights_desc_init: {
    parameters: [
      "pointer",
      "i32",
      "pointer",
      "pointer",
      "pointer",
      "pointer",
      "pointer",
      "pointer",
      "pointer",
      "pointer",
    ],
    result: "i32",
  },
  dnnl_primitive_desc_create: {
    parameters: ["pointer", "pointer", "pointer", "pointer", "pointer"],
    result: "i32",
  },
  dnnl_primitive_create: { parameters: ["pointer", "pointer"], result: "i32" },
  dnnl_memory_create: { parameters: ["pointer", "pointer", "pointer", "pointer"], result: "i32" },
  dnnl_memory_set_data_handle: { parameters: ["pointer", "pointer"], result: "i32" },
  dnnl_primitive_execute: { parameters: ["pointer", "pointer", "i32", "pointer"], result: "i32" },
  dnnl_stream_wait: { parameters: ["pointer"], result: "i32" },
  dnnl_batch_normalization_forward_desc_init: {
    parameters: ["pointer", "i32", "pointer", "f32", "u32"],
    result: "i32",
  },
  dnnl_batch_normalization_backward_desc_init: {
    parameters: ["pointer", "i32", "pointer", "pointer", "f32", "u32"],
    result: "i32",
  },
  dnnl_memory_desc_init_by_tag: {
    parameters: ["pointer", "i32", "pointer", "i32", "i32"],
    result: "i32",
  },
  dnnl_primitive_desc_query_md: { parameters: ["pointer", "i32", "i32"], result: "pointer" },
  dnnl_memory_desc_equal: { parameters: ["pointer", "pointer"], result: "i32" },
  dnnl_memory_desc_get_size: { parameters: ["pointer"], result: "usize" },
  dnnl_reorder_primitive_desc_create: {
    parameters: ["pointer", "pointer", "pointer", "pointer", "pointer", "pointer"],
    result: "i32",
  },
  dnnl_binary_desc_init: { parameters: ["pointer", "i32", "pointer", "pointer", "pointer"], result: "i32" },
  dnnl_eltwise_forward_desc_init: {
    parameters: ["pointer", "i32", "i32", "pointer", "f32", "f32"],
    result: "i32",
  },
  dnnl_eltwise_backward_desc_init: {
    parameters: ["pointer", "i32", "pointer", "pointer", "f32", "f32"],
    result: "i32",
  },
  dnnl_post_ops_create: { parameters: ["pointer"], result: "i32" },
  dnnl_post_ops_append_eltwise: { parameters: ["pointer", "f32", "i32", "f32", "f32"], result: "i32" },
  dnnl_primitive_attr_create: { parameters: ["pointer"], result: "i32" },
  dnnl_primitive_attr_set_post_ops: { parameters: ["pointer", "pointer"], result: "i32" },
} as const;

/** dnnl enums (stable across v1/v2). */
export const DNNL_CPU = 1;
export const DNNL_STREAM_DEFAULT = 1;
export const DNNL_F32 = 3;
/** bfloat16: fp32's sign and 8-bit exponent, 7 stored mantissa bits (8 with the implicit one). */
export const DNNL_BF16 = 2;
export const DNNL_FORWARD_TRAINING = 64;
export const DNNL_CONVOLUTION_DIRECT = 1;
export const ARG_SRC = 1;
export const ARG_DST = 17;
export const ARG_WEIGHTS = 33;
export const ARG_DIFF_SRC = 129;
export const ARG_DIFF_DST = 145;
export const ARG_DIFF_WEIGHTS = 161;
export const ARG_FROM = 1;
export const ARG_TO = 17;
export const DNNL_FORMAT_TAG_ANY = 1;
export const QUERY_WEIGHTS_MD = 131;
export const QUERY_EXEC_ARG_MD = 255;
export const DNNL_BACKWARD = 128;
/** Batch norm takes the mean and variance as inputs instead of computing them. */
export const DNNL_USE_GLOBAL_STATS = 0x1;
export const DNNL_FUSE_NORM_RELU = 0x4;
export const DNNL_USE_SCALE = 0x8;
export const DNNL_USE_SHIFT = 0x10;
export const ARG_MEAN = 49;
export const ARG_VARIANCE = 50;
export const ARG_SCALE = 51;
export const ARG_SHIFT = 52;
export const ARG_WORKSPACE = 64;
export const ARG_DIFF_SCALE = 255;
export const ARG_DIFF_SHIFT = 256;
export const QUERY_DIFF_WEIGHTS_MD = 132;
export const ARG_SRC_1 = 2;
export const DNNL_BINARY_ADD = 0x1fff0;
export const DNNL_ELTWISE_RELU = 0x1f;
/** ReLU whose backward reads the forward's output instead of its input (dy where y > 0). */
export const DNNL_ELTWISE_RELU_USE_DST_FOR_BWD = 0x100;
/** Generous sizes for the opaque descriptor structs (v2.6: memory desc ~1 KB, op desc a few KB). */
export const MEMORY_DESC_BYTES = 4096;
export const OP_DESC_BYTES = 16384;
