/**
 * A custom pipeline in a few lines: SwAV with hard (one-hot) codes instead of
 * Sinkhorn's soft ones. The assignment is a stage value with the sinkhorn
 * stage's types; everything else (encoder, loss, LARC-SGD, schedule, queue,
 * checkpoints) is the stock pretraining pipeline.
 *
 *   npx deno run -A examples/custom_pipeline.ts [config.json]
 */
import * as tf from "@tensorflow/tfjs";
import { Effect } from "effect";
import {
  loadRunConfig,
  pretrain,
  SinkhornConfig,
  type SinkhornInput,
  sinkhornStage,
  TensorBackend,
  tensorStage,
} from "../mod.ts";

/** Each sample's code replaced by the one-hot of its best prototype under Sinkhorn. */
export const hardAssignStage = tensorStage({
  name: "hardAssign",
  config: SinkhornConfig,
  apply: (config) => {
    const soft = sinkhornStage.apply(config);
    return (input: SinkhornInput) =>
      tf.tidy(() => soft(input).map((q) => tf.oneHot(q.argMax(1), q.shape[1]).toFloat() as tf.Tensor2D));
  },
});

if (import.meta.main) {
  const program = Effect.gen(function* () {
    const config = yield* loadRunConfig(Deno.args[0] ?? "bench/configs/demo.json");
    const result = yield* pretrain(config, { stages: { assign: hardAssignStage } });
    console.log(`${result.steps} steps, last loss ${result.lastLoss.toFixed(4)}`);
  });
  await Effect.runPromise(program.pipe(Effect.provide(TensorBackend.layer())));
}
