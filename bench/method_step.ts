/**
 * `bench --stage step --method deepclusterv2|simclr`: one training step of another method than
 * SwAV on the benchmark's fixture, as the generic step runs it (pipelines/train_step.ts): the
 * method's forward on one tape, backward, LARC-SGD update, the method's state update. DeepCluster-v2's
 * bank and targets are random (the k-means runs once an epoch, not per step).
 */
import * as tf from "@tensorflow/tfjs";
import { Effect } from "effect";
import type { RunConfig } from "../config/config.ts";
import { prototypeHeads } from "../models/model.ts";
import { deepClusterV2Method } from "../pipelines/deepclusterv2.ts";
import { simclrMethod } from "../pipelines/simclr.ts";
import { gradientsOf, type Method, type StepInput } from "../pipelines/train_step.ts";
import { makeMemoryBank } from "../state/memory_bank.ts";
import { rngFor } from "../data/rng.ts";
import type { LarcSgd } from "../stages/optimise.ts";
import type { SwavModel } from "../models/model.ts";

interface MethodFixture {
  readonly config: RunConfig;
  readonly model: SwavModel;
  readonly variables: Record<string, tf.Variable>;
  readonly crops: tf.Tensor4D[];
  readonly optimiser: LarcSgd;
}

/** The method value of the fixture's config (train.method deepclusterv2 or simclr). */
export const benchMethod = (fixture: MethodFixture, batch: number): Method => {
  const { config, model, variables, optimiser } = fixture;
  const state = { model, variables, optimiser, queue: () => undefined };
  if (config.train.method === "simclr") return simclrMethod(config, state, batch);
  const size = 4 * batch;
  const bank = makeMemoryBank({
    size,
    dim: config.model.out,
    crops: config.deepclusterv2.cropsForAssign.length,
    heads: prototypeHeads(config.model).length,
  });
  const rng = rngFor(11, 0, 0);
  prototypeHeads(config.model).forEach((head, h) => {
    for (let i = 0; i < size; i++) bank.targets[h]![i] = rng.int(0, head.k - 1);
  });
  return deepClusterV2Method(config, state, bank);
};

/** One step; resolves once the update has run. */
export const methodBenchStep = (fixture: MethodFixture, method: Method, batch: number): Promise<void> => {
  const input: StepInput = {
    batch: {
      epoch: 0,
      indices: Int32Array.from({ length: batch }, (_, i) => i),
      labels: new Int32Array(batch),
      views: [],
    },
    step: 0,
    epoch: 0,
  };
  return Effect.runPromise(Effect.scoped(Effect.gen(function* () {
    const forward = yield* method.prepare(input);
    const variableList = Object.values(fixture.variables);
    const out = gradientsOf(() => forward(fixture.crops), variableList);
    const loss = (yield* Effect.promise(() => out.loss.data()))[0]!;
    if (!Number.isFinite(loss)) throw new Error(`bench step: loss ${loss}`);
    const grads: tf.NamedTensorMap = {};
    for (const [name, variable] of Object.entries(fixture.variables)) {
      const g = out.grads[variable.name];
      if (g !== undefined) grads[name] = g;
    }
    fixture.optimiser.step(fixture.variables, grads, 0.01);
    yield* method.update(input, out);
    tf.dispose([out.loss, out.embeddings, ...out.codes, ...Object.values(out.grads)]);
    yield* Effect.promise(() => variableList[0]!.data());
  })));
};
