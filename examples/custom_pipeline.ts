/**
 * A custom pipeline in a few lines: SwAV with hard (one-hot) codes instead of
 * Sinkhorn's soft ones. Everything else (encoder, loss, LARC-SGD, schedule,
 * queue, checkpoints) is the stock pretraining pipeline.
 *
 *   npx deno run -A examples/custom_pipeline.ts [config.json]
 */
import * as tf from "@tensorflow/tfjs";
import { Effect } from "effect";
import { loadRunConfig, pretrain, type PretrainOptions, swavParts, TensorBackend } from "../mod.ts";

/** The SwAV step with each sample's code replaced by the one-hot of its best prototype. */
export const hardAssignment: PretrainOptions["parts"] = (model, config, batchSize) => {
  const parts = swavParts(model, config, batchSize);
  return {
    ...parts,
    assign: (scores, queueScores) =>
      parts.assign(scores, queueScores).map((q) =>
        tf.oneHot(q.argMax(1), q.shape[1]).toFloat() as tf.Tensor2D
      ),
  };
};

if (import.meta.main) {
  const program = Effect.gen(function* () {
    const config = yield* loadRunConfig(Deno.args[0] ?? "bench/configs/demo.json");
    const result = yield* pretrain(config, { parts: hardAssignment });
    console.log(`${result.steps} steps, last loss ${result.lastLoss.toFixed(4)}`);
  });
  await Effect.runPromise(program.pipe(Effect.provide(TensorBackend.layer())));
}
