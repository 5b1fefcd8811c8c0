/**
 * Computing off the gradient tape. Inside a kernel's forward (and a
 * `customGrad` forward) nothing is recorded on an active tape: that is how
 * Sinkhorn codes, the queue's rows and the prototypes' normalisation stay
 * detached inside the training step's `tf.variableGrads`.
 */
import * as tf from "@tensorflow/tfjs";
import { markConstant } from "./lean_gradients.ts";

/**
 * Runs `compute` on `inputs` with no gradient flowing back to them: inside a
 * gradient tape the result is a single op whose gradient is zero for every
 * input, and the ops inside `compute` are not recorded on the tape.
 */
export const withoutGradient = <T extends tf.Tensor>(
  compute: (...inputs: tf.Tensor[]) => T,
  inputs: readonly tf.Tensor[],
): T => {
  const op = tf.customGrad((...args: (tf.Tensor | tf.GradSaveFunc)[]) => {
    const tensors = args.slice(0, inputs.length) as tf.Tensor[];
    const out = compute(...tensors);
    // The forward runs in a tidy of its own: return a tensor that is not an input.
    const value = tensors.includes(out) ? out.clone() : out;
    return { value, gradFunc: () => tensors.map((t) => tf.zerosLike(t)) };
  });
  // Marked for the training step's gradient walk, which then skips it and what is computed from it.
  return markConstant(op(...inputs) as T);
};
