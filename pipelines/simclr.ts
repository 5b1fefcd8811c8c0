/**
 * SimCLR as a method of the generic step: encode every crop, NT-Xent over the
 * unit-norm embeddings (stages/nt_xent.ts); no prototypes, no targets, no state.
 *
 * Its collapse signal is the embeddings' spread (`embeddingStd`): the mean over
 * dimensions of the batch's standard deviation, about 1/√D for embeddings
 * spread over the sphere and 0 when they collapse to one point.
 */
import * as tf from "@tensorflow/tfjs";
import { Effect } from "effect";
import type { RunConfig } from "../config/config.ts";
import { encodeStage } from "../stages/encode.ts";
import { ntXent } from "../stages/nt_xent.ts";
import type { Method, StepState } from "./train_step.ts";

/** Mean over dimensions of the rows' standard deviation, read asynchronously. */
export const embeddingStd = async (embeddings: tf.Tensor2D): Promise<number> => {
  const std = tf.tidy(() => tf.mean(tf.sqrt(tf.moments(embeddings, 0).variance)));
  try {
    return (await std.data())[0]!;
  } finally {
    std.dispose();
  }
};

/** SimCLR as a method value. */
export const simclrMethod = (config: RunConfig, state: StepState, batchSize: number): Method => {
  const encode = encodeStage.apply({ training: true });
  return {
    name: "simclr",
    prepare: () =>
      Effect.succeed((crops) => {
        const { embeddings, features } = encode({ model: state.model, cropGroups: crops });
        const loss = ntXent({ embeddings, batchSize }, config.simclr);
        return { loss, embeddings, codes: [], features };
      }),
    update: () => Effect.void,
    statistics: async (out) => ({ embeddingStd: await embeddingStd(out.embeddings) }),
    nonFiniteHint: "Try a lower optim.baseLr or a larger simclr.temperature.",
  };
};
