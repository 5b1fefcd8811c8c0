/**
 * The training step puts the prototypes on the unit sphere before each
 * forward pass, as the reference does (`w = model.prototypes.weight.data;
 * w = normalize(w, dim=1)` at the top of each iteration): a step-level check
 * through the stock pretrain pipeline, with an encode stage that reads the
 * prototypes' row norms as the forward pass starts. Without the
 * normalisation the LARC updates move the rows off the sphere from the first
 * step on.
 */
import assert from "node:assert/strict";
import { Effect, Exit } from "effect";
import { TensorBackend } from "../backend/tensor_backend.ts";
import { decodeRunConfig } from "../config/config.ts";
import { PROTOTYPES_WEIGHT } from "../models/head.ts";
import { pretrain } from "../pipelines/pretrain.ts";
import { encodeStage } from "../stages/encode.ts";
import { tinyRunConfig, writeTinyData } from "./_tiny_run.ts";

Deno.test("each training step sees unit-norm prototypes at the start of its forward pass", async () => {
  const data = await writeTinyData();
  const out = await Deno.makeTempDir({ prefix: "swav-prototype-norm-" });
  try {
    /** Per step: the largest | ‖row‖ − 1 | of the prototypes as the forward pass starts. */
    const offNorm: number[] = [];
    const recordingEncode: typeof encodeStage = {
      ...encodeStage,
      apply: (config) => {
        const forward = encodeStage.apply(config);
        return (input) => {
          const w = input.model.param(PROTOTYPES_WEIGHT);
          const [k, d] = w.shape as [number, number];
          const values = w.dataSync();
          let worst = 0;
          for (let r = 0; r < k; r++) {
            let ss = 0;
            for (let j = 0; j < d; j++) ss += values[r * d + j]! ** 2;
            worst = Math.max(worst, Math.abs(Math.sqrt(ss) - 1));
          }
          offNorm.push(worst);
          return forward(input);
        };
      },
    };
    // Prototypes not frozen, so every step's update moves them; a large rate so it moves them visibly.
    const raw = tinyRunConfig(data, out, { epochs: 1, maxSteps: 4, knnEvery: 0 });
    const config = await Effect.runPromise(decodeRunConfig({
      ...raw,
      swav: { ...raw.swav, freezePrototypesIters: 0 },
      optim: { ...raw.optim, baseLr: 2, trust: 0.02 },
    }, "test"));
    const exit = await Effect.runPromiseExit(
      pretrain(config, { stages: { encode: recordingEncode } }).pipe(
        Effect.provide(TensorBackend.layer("wasm")),
      ),
    );
    assert.ok(Exit.isSuccess(exit), String(Exit.isFailure(exit) ? exit.cause : ""));
    assert.equal(offNorm.length, 4, "one forward pass a step");
    // float32 rows normalised in float64: within a few float32 ulps of 1.
    assert.ok(offNorm.every((e) => e < 1e-6), `prototype row norms off 1 by ${offNorm}`);
  } finally {
    await Deno.remove(out, { recursive: true });
    await Deno.remove(data, { recursive: true });
  }
});
