/**
 * A user's own training method as one more value: Wang & Isola's alignment +
 * uniformity objective (2020) on the unit-norm embeddings, with no prototypes
 * and no state. The stock pipeline runs it like SwAV, DeepCluster-v2 or SimCLR:
 * data, multi-crop, LARC-SGD, schedule, checkpoints, metrics.
 *
 *   alignment   mean squared distance between two crops of the same image
 *   uniformity  log of the mean of exp(-2 ‖zᵢ − zⱼ‖²) over the batch's pairs (first crop)
 *
 *   npx deno run -A examples/custom_method.ts config.json   (with "train": {"method": "simclr"}: no prototype heads)
 */
import * as tf from "@tensorflow/tfjs";
import { Effect } from "effect";
import { type CustomMethod, encodeStage, loadRunConfig, pretrain, TensorBackend } from "../mod.ts";

/** The objective on crop-major embeddings [crops * batch, D]: alignment of crops 0 and 1 + uniformity. */
export const alignUniformLoss = (z: tf.Tensor2D, batch: number): tf.Scalar =>
  tf.tidy(() => {
    const a = z.slice([0, 0], [batch, -1]);
    const b = z.slice([batch, 0], [batch, -1]);
    const alignment = tf.mean(tf.sum(tf.square(tf.sub(a, b)), 1));
    // ‖zᵢ − zⱼ‖² = 2 − 2 zᵢ·zⱼ for unit vectors; the diagonal left out with a large distance.
    const squared = tf.sub(2, tf.mul(2, tf.matMul(a, a, false, true)));
    const offDiagonal = tf.add(squared, tf.mul(tf.eye(batch), 1e4));
    const uniformity = tf.log(tf.div(tf.sum(tf.exp(tf.mul(offDiagonal, -2))), batch * (batch - 1)));
    return tf.add(alignment, uniformity) as tf.Scalar;
  });

/** The method value: encode on the tape, the objective, nothing before or after. */
export const alignUniformMethod: CustomMethod = (_config, state, batchSize) => {
  const encode = encodeStage.apply({ training: true });
  return {
    name: "align-uniform",
    prepare: () =>
      Effect.succeed((crops) => {
        const { embeddings, features } = encode({ model: state.model, cropGroups: crops });
        return { loss: alignUniformLoss(embeddings, batchSize), embeddings, codes: [], features };
      }),
    update: () => Effect.void,
    statistics: () => Promise.resolve({}),
    nonFiniteHint: "Try a lower optim.baseLr.",
  };
};

if (import.meta.main) {
  if (Deno.args[0] === undefined) {
    console.error('usage: examples/custom_method.ts CONFIG.json (with "train": {"method": "simclr"})');
    Deno.exit(2);
  }
  const program = Effect.gen(function* () {
    // The method has no prototypes: its config names train.method "simclr" (a model without prototype heads).
    const config = yield* loadRunConfig(Deno.args[0]!);
    const result = yield* pretrain(config, { method: alignUniformMethod });
    console.log(`${result.steps} steps, last loss ${result.lastLoss.toFixed(4)}`);
  });
  await Effect.runPromise(program.pipe(Effect.provide(TensorBackend.layer())));
}
