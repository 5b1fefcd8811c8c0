/**
 * The gradient boundary of SwAV's step, made explicit. Encode and the loss sit
 * on one gradient tape; the assignment (codes) works on detached scores, off
 * the tape:
 *
 *   on the tape    input ──encode──▶ embeddings, scores ─────────────────┐
 *   off the tape                     scores (constants) ──assign──▶ codes ┤
 *   on the tape                                          swapped loss ◀──┘
 *
 * `onOneTape` builds the tape's synchronous body from three tensor stages
 * (already configured); `onTape` runs such a body under a `tf.variableGrads`-
 * style function and hands back the loss, the gradients and, as constants for
 * the queue and the metrics, the embeddings and the codes.
 */
import * as tf from "@tensorflow/tfjs";
import type { NamedTensorMap, Scalar, Tensor2D, Variable } from "../backend/tensor_types.ts";
import type { CropLayout } from "./crop_layout.ts";
import type { EncodeOutput } from "./encode.ts";
import { withoutGradient } from "../backend/no_gradient.ts";
import { kernelInvariant } from "../backend/invariant.ts";
import type { SinkhornInput } from "./sinkhorn.ts";
import type { SwappedLossInput } from "./swapped_loss.ts";

/** `tf.variableGrads`' signature (also that of backend/lean_gradients.ts' `leanVariableGrads`). */
export type VariableGrads = (
  f: () => Scalar,
  variables: Variable[],
) => { value: Scalar; grads: NamedTensorMap };

/**
 * `assign` on constants: one op whose gradient is zero for the scores and the
 * queue's scores (nothing inside it is recorded on a tape), its codes stacked
 * in that op and split back into one [bs, K] code per assignment crop.
 */
export const detached =
  (assign: (input: SinkhornInput) => readonly Tensor2D[]): (input: SinkhornInput) => Tensor2D[] =>
  (input: SinkhornInput): Tensor2D[] =>
    tf.tidy(() => {
      let count = 0;
      const stacked = withoutGradient((scores, ...queue) => {
        const codes = assign({
          ...input,
          scores: scores as Tensor2D,
          queueScores: queue.length === 0 ? undefined : queue as Tensor2D[],
        });
        count = codes.length;
        return tf.concat(codes as Tensor2D[], 0);
      }, [input.scores, ...(input.queueScores ?? [])]);
      // (tf.split's gradient fails for a single piece, so one code is returned whole)
      return count === 1 ? [stacked] : tf.split(stacked, count, 0) as Tensor2D[];
    });

/** What the tape's body takes: the encoder's input, the batch's crop layout and the queue's scores. */
export interface TapeInput<EncodeIn> {
  /** What the encoder takes (the batch's crops). */
  readonly encode: EncodeIn;
  /** How the score rows are laid out by crop. */
  readonly layout: CropLayout;
  /** The queue's scores per assignment crop, prepended before the assignment. */
  readonly queueScores?: readonly Tensor2D[] | undefined;
}

/** What the tape's body computes. */
export interface TapeForward {
  /** The loss, recorded on the tape. */
  readonly loss: Scalar;
  /** All crops' embeddings [batch * crops, D], crop-major. */
  readonly embeddings: Tensor2D;
  /** One code [batch, K] per assignment crop, without gradient. */
  readonly codes: Tensor2D[];
  /** The backbone's pooled features [batch * crops, F], crop-major, where the encoder gives them (online probe). */
  readonly features?: Tensor2D | undefined;
}

/**
 * The tape's body from three configured tensor stages: encode, then the
 * assignment on detached scores, then the loss from the scores and the codes.
 * Synchronous: it runs inside a `tf.variableGrads` closure.
 */
export const onOneTape = <EncodeIn>(
  encode: (input: EncodeIn) => EncodeOutput,
  assign: (input: SinkhornInput) => readonly Tensor2D[],
  loss: (input: SwappedLossInput) => Scalar,
): (input: TapeInput<EncodeIn>) => TapeForward => {
  const assignDetached = detached(assign);
  return (input: TapeInput<EncodeIn>): TapeForward => {
    const { embeddings, scores: maybeScores, features } = encode(input.encode);
    // The swapped prediction scores one prototype head: the model's config says so (a number K).
    kernelInvariant(maybeScores !== undefined, () => "the swapped prediction needs one prototype head");
    const scores = maybeScores;
    const codes = assignDetached({ scores, layout: input.layout, queueScores: input.queueScores });
    return { loss: loss({ scores, codes }), embeddings, codes, features };
  };
};

/** What a tape hands back; every tensor is owned by the caller. */
export interface TapeOutputs {
  /** The loss's value. */
  readonly loss: Scalar;
  /** The loss's gradient for each variable, by variable name. */
  readonly grads: NamedTensorMap;
  /** All crops' embeddings [batch * crops, D], crop-major, as constants (for the queue). */
  readonly embeddings: Tensor2D;
  /** The codes, [batch, K] each (for metrics). */
  readonly codes: Tensor2D[];
  /** The backbone's pooled features as constants, where the encoder gives them (for an online probe). */
  readonly features?: Tensor2D | undefined;
}

/** Runs `forward` under `variableGrads` over `variables`: gradients of its loss. */
export const onTape = (
  variableGrads: VariableGrads,
  forward: () => TapeForward,
  variables: readonly Variable[],
  /** Also hand back the backbone's features (for an online probe); off, they are freed with the tape. */
  keepFeatures = false,
): TapeOutputs => {
  let kept: Tensor2D | undefined;
  let codes: Tensor2D[] = [];
  let features: Tensor2D | undefined;
  const { value, grads } = variableGrads(() => {
    const out = forward();
    codes = out.codes.map((c) => tf.keep(c));
    kept = tf.keep(out.embeddings);
    // Kept as they are (no op is added to the tape): the probe reads them after the backward pass.
    features = keepFeatures && out.features !== undefined ? tf.keep(out.features) : undefined;
    return out.loss;
  }, variables as Variable[]);
  return { loss: value, grads, embeddings: kept!, codes, ...(features === undefined ? {} : { features }) };
};
