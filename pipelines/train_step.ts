/**
 * One SwAV training step, with the gradient boundary written out:
 *
 *   off the tape   normalise the prototypes; score the queue with them
 *   on the tape    encode all crops -> embeddings z, scores z·Cᵀ
 *                  │  codes = Sinkhorn(detached scores, queue scores)   (off the tape: no gradient)
 *                  └> swapped loss(scores, codes)
 *   off the tape   drop the prototypes' gradient while frozen; LARC-SGD update;
 *                  push the assignment crops' embeddings into the queue; metrics
 *
 * The parts are plain synchronous functions so they can sit inside one
 * `tf.variableGrads` closure; a custom pipeline swaps any of them (another
 * encoder, another loss, no queue) without touching the rest.
 */
import * as tf from "@tensorflow/tfjs";
import { leanVariableGrads } from "../backend/lean_gradients.ts";

/** The three pieces that run inside the gradient tape. */
export interface TrainStepParts {
  /** Crops grouped by resolution -> unit-norm embeddings [N, D] and prototype scores [N, K], crop-major. */
  readonly encode: (crops: readonly tf.Tensor4D[]) => { embeddings: tf.Tensor2D; scores: tf.Tensor2D };
  /** Codes (one [batch, K] per assignment crop) from scores; must carry no gradient. */
  readonly assign: (scores: tf.Tensor2D, queueScores: readonly tf.Tensor2D[] | undefined) => tf.Tensor2D[];
  /** The loss from scores and (constant) codes. */
  readonly loss: (scores: tf.Tensor2D, codes: readonly tf.Tensor2D[]) => tf.Scalar;
}

/** What one step hands back, all values already read from the backend. */
export interface StepResult {
  readonly loss: number;
  /** Mean entropy (nats) of the codes' rows: ln K for uniform codes, 0 for one-hot ones. */
  readonly codeEntropy: number;
  /** Distinct prototypes that are the argmax of some sample's code in this batch. */
  readonly prototypesInUse: number;
}

export interface TapeOutputs {
  readonly loss: tf.Scalar;
  readonly grads: tf.NamedTensorMap;
  /** All crops' embeddings [batch * crops, D], crop-major, as constants (for the queue). */
  readonly embeddings: tf.Tensor2D;
  /** The codes, [batch, K] each (for metrics). */
  readonly codes: tf.Tensor2D[];
}

/**
 * `leanBackward: false` runs TF.js's own `tf.variableGrads` (every gradient and
 * saved tensor kept to the end of the backward pass): the same gradients with
 * about twice the peak memory; kept for before/after measurements
 * (bench/step_variants.ts).
 */
export const trainStepOptions = { leanBackward: true };

/**
 * Runs encode, assign and loss inside one gradient tape over `variables`.
 * Every returned tensor is owned by the caller.
 */
export const forwardBackward = (
  parts: TrainStepParts,
  crops: readonly tf.Tensor4D[],
  variables: readonly tf.Variable[],
  options: { queueScores?: readonly tf.Tensor2D[] | undefined } = {},
): TapeOutputs => {
  let kept: tf.Tensor2D | undefined;
  let codes: tf.Tensor2D[] = [];
  // tf.variableGrads' walk, freeing each gradient and saved activation after its last use.
  const variableGrads = trainStepOptions.leanBackward ? leanVariableGrads : tf.variableGrads;
  const { value, grads } = variableGrads(() => {
    const { embeddings, scores } = parts.encode(crops);
    // The gradient boundary: assign sees the scores but returns codes with no gradient.
    codes = parts.assign(scores, options.queueScores).map((c) => tf.keep(c));
    kept = tf.keep(embeddings);
    return parts.loss(scores, codes);
  }, variables as tf.Variable[]);
  return { loss: value, grads, embeddings: kept!, codes };
};

/** Code entropy and prototypes in use, read from the codes (asynchronously). */
export const codeStatistics = async (codes: readonly tf.Tensor2D[]): Promise<Omit<StepResult, "loss">> => {
  const [entropy, argmax] = tf.tidy(() => {
    const all = tf.concat(codes as tf.Tensor2D[], 0);
    const h = all.mul(all.add(1e-12).log()).sum(1).neg().mean();
    return [h, all.argMax(1)];
  });
  const [h, winners] = await Promise.all([entropy.data(), argmax.data()]);
  tf.dispose([entropy, argmax]);
  return { codeEntropy: h[0]!, prototypesInUse: new Set(winners).size };
};
