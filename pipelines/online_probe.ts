/**
 * The online probe (`train.onlineProbe`): a linear classifier trained during
 * pretraining on the backbone's features of each batch's first crop, for
 * labelled sources, as lightly's and solo-learn's online classifiers do. It
 * follows how linearly separable the features are while the run goes, at the
 * cost of one small matrix product per step and one pass over the test split
 * per epoch.
 *
 * The features are constants taken from the step's forward pass (kept after
 * the tape, never on it): the probe's gradients reach only its own weight and
 * bias, so the SwAV losses and updates are exactly those of a run without it.
 * The probe is plain SGD with momentum 0.9 at a constant rate 0.1 (solo-learn's
 * online classifier rate), weights from zero, softmax cross-entropy; samples
 * without a label (-1) are left out.
 */
import * as tf from "@tensorflow/tfjs";
import { Effect } from "effect";
import type { RunConfig } from "../config/config.ts";
import type { DecodeError } from "../data/image_codec.ts";
import type { LoaderError } from "../data/loader.ts";
import type { DataSource } from "../data/sources.ts";
import type { SwavModel } from "../models/model.ts";
import { extractFeatures } from "./extract.ts";
import { runEvalTransform } from "./knn.ts";

export interface OnlineProbe {
  /** One SGD step on features [B, D] (constants) and their labels; unlabelled rows (-1) are skipped. */
  readonly train: (features: tf.Tensor2D, labels: Int32Array) => void;
  /** Top-1 of the probe on the test split's features (the eval transform, backbone in eval mode). */
  readonly top1: (
    model: SwavModel,
    test: DataSource,
    config: RunConfig,
  ) => Effect.Effect<number, DecodeError | LoaderError>;
}

export const ONLINE_PROBE_LR = 0.1;
export const ONLINE_PROBE_MOMENTUM = 0.9;

const zeroVariable = (shape: number[], trainable: boolean): tf.Variable => {
  const initial = tf.zeros(shape);
  const variable = tf.variable(initial, trainable);
  initial.dispose();
  return variable;
};

/** The probe's variables and momentum slots, released by the scope. */
export const makeOnlineProbe = (featureDim: number, numClasses: number) =>
  Effect.map(
    Effect.acquireRelease(
      // Each initial value is freed once its variable holds a copy (tf.variable leaves its argument alive).
      Effect.sync(() => ({
        weight: zeroVariable([featureDim, numClasses], true) as tf.Variable<tf.Rank.R2>,
        bias: zeroVariable([numClasses], true) as tf.Variable<tf.Rank.R1>,
        weightSlot: zeroVariable([featureDim, numClasses], false),
        biasSlot: zeroVariable([numClasses], false),
      })),
      (v) => Effect.sync(() => tf.dispose([v.weight, v.bias, v.weightSlot, v.biasSlot])),
    ),
    (v): OnlineProbe => ({
      train: (features, labels) => {
        const rows: number[] = [];
        labels.forEach((label, i) => {
          if (label >= 0 && label < numClasses && i < features.shape[0]) rows.push(i);
        });
        if (rows.length === 0) return;
        tf.tidy(() => {
          const index = tf.tensor1d(Int32Array.from(rows), "int32");
          const x = tf.gather(features, index);
          const target = tf.oneHot(tf.gather(tf.tensor1d(labels, "int32"), index), numClasses);
          const { grads } = tf.variableGrads(
            () => tf.losses.softmaxCrossEntropy(target, x.matMul(v.weight).add(v.bias)) as tf.Scalar,
            [v.weight, v.bias],
          );
          for (
            const [param, slot, grad] of [
              [v.weight, v.weightSlot, grads[v.weight.name]!],
              [v.bias, v.biasSlot, grads[v.bias.name]!],
            ] as const
          ) {
            slot.assign(slot.mul(ONLINE_PROBE_MOMENTUM).add(grad));
            param.assign(param.sub(slot.mul(ONLINE_PROBE_LR)));
          }
        });
      },
      top1: (model, test, config) =>
        Effect.gen(function* () {
          const { features, labels } = yield* extractFeatures(model, test, runEvalTransform(config));
          const predicted = tf.tidy(() => features.matMul(v.weight).add(v.bias).argMax(1));
          const values = yield* Effect.promise(() => predicted.data());
          tf.dispose([features, predicted]);
          let correct = 0;
          labels.forEach((label, i) => {
            if (values[i] === label) correct++;
          });
          return labels.length === 0 ? 0 : correct / labels.length;
        }),
    }),
  );
