/**
 * The TF.js tensor types that appear in swav-ts's public signatures, named
 * here so the generated reference documents them and links to TF.js's own.
 * They are the TF.js types themselves, not copies: any TF.js tensor fits.
 * @module
 */
import type * as tf from "@tensorflow/tfjs-core";

/** A TF.js tensor of any rank: what the stages pass between each other. */
export type Tensor = tf.Tensor;

/** A TF.js rank-2 tensor: scores [B, K], embeddings [B, D], codes [B, K]. */
export type Tensor2D = tf.Tensor2D;

/** A TF.js rank-0 tensor: a loss. */
export type Scalar = tf.Scalar;

/** A trainable TF.js tensor (a model weight), updated in place by an optimiser. */
export type Variable = tf.Variable;

/** Tensors by name, as TF.js's `variableGrads` returns the gradients of a loss. */
export type NamedTensorMap = tf.NamedTensorMap;

/** A TF.js rank-4 tensor: a batch of images or feature maps, [N, H, W, C]. */
export type Tensor4D = tf.Tensor4D;
