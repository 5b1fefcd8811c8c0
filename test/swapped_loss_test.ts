import * as tf from "@tensorflow/tfjs";
import assert from "node:assert/strict";
import fc from "fast-check";
import { Effect, Exit } from "effect";
import { initBackend, resolveBackendName } from "../backend/tensor_backend.ts";
import {
  assignmentCodes,
  CropLayoutError,
  swappedLossFromCodes,
  swappedLossStage,
  swappedPredictionLoss,
} from "../stages/swapped_loss.ts";
import { configure } from "../stages/stage.ts";
import { assertNoTensorLeak, relativeError, values } from "./_helpers.ts";

interface LossCase {
  batchSize: number;
  nmbCrops: number[];
  cropsForAssign: number[];
  k: number;
  epsilon: number;
  iterations: number;
  temperature: number;
  queueLength: number;
  scores: number[];
  queueScores: number[][] | null;
  loss: number;
  grad: number[];
}
const fixture = JSON.parse(await Deno.readTextFile(new URL("./fixtures/core.json", import.meta.url))) as {
  loss: LossCase[];
};

await initBackend(await Effect.runPromise(resolveBackendName(undefined, "cpu")));

/**
 * float32 against float64 (the issue asks for well under 1e-4 on the loss).
 * Measured over the fixtures: loss 1e-8 to 1e-7, gradient (norm-wise) about 1.5e-7.
 */
const LOSS_TOLERANCE = 1e-6;
const GRAD_TOLERANCE = 1e-5;

const total = (c: { nmbCrops: readonly number[] }) => c.nmbCrops.reduce((a, b) => a + b, 0);

const lossAndGrad = async (c: LossCase): Promise<{ loss: number; grad: Float64Array }> => {
  const scores = tf.tensor2d(c.scores, [c.batchSize * total(c), c.k]);
  const queueScores = c.queueScores?.map((q) => tf.tensor2d(q, [c.queueLength, c.k]));
  const { value, grads } = tf.tidy(() => {
    const { value, grad } = tf.valueAndGrad((s: tf.Tensor) =>
      swappedPredictionLoss(s as tf.Tensor2D, { ...c, queueScores })
    )(
      scores,
    );
    return { value, grads: grad };
  });
  const result = { loss: (await values(value))[0]!, grad: await values(grads) };
  tf.dispose([scores, value, grads, ...(queueScores ?? [])]);
  return result;
};

/** Float64 loss from codes, transcribing the reference loop; independent of tf. */
const loss64 = (
  scores: ArrayLike<number>,
  codes: ArrayLike<number>[],
  bs: number,
  k: number,
  nCrops: number,
  cropsForAssign: readonly number[],
  temperature: number,
): number => {
  let loss = 0;
  cropsForAssign.forEach((crop, i) => {
    let sub = 0;
    for (let v = 0; v < nCrops; v++) {
      if (v === crop) continue;
      let mean = 0;
      for (let b = 0; b < bs; b++) {
        const row = (v * bs + b) * k;
        let m = -Infinity;
        for (let j = 0; j < k; j++) m = Math.max(m, scores[row + j]! / temperature);
        let z = 0;
        for (let j = 0; j < k; j++) z += Math.exp(scores[row + j]! / temperature - m);
        let dot = 0;
        for (let j = 0; j < k; j++) {
          dot += codes[i]![b * k + j]! * (scores[row + j]! / temperature - m - Math.log(z));
        }
        mean += dot / bs;
      }
      sub -= mean;
    }
    loss += sub / (nCrops - 1);
  });
  return loss / cropsForAssign.length;
};

Deno.test("swapped prediction loss", async (t) => {
  await t.step("loss and gradient match the float64 torch reference for every crop layout", async () => {
    await assertNoTensorLeak("fixtures", async () => {
      assert.ok(fixture.loss.some((c) => c.queueLength > 0) && fixture.loss.some((c) => c.queueLength === 0));
      assert.ok(fixture.loss.some((c) => c.nmbCrops.length > 1));
      for (const c of fixture.loss) {
        const label =
          `bs=${c.batchSize} crops=[${c.nmbCrops}] assign=[${c.cropsForAssign}] queue=${c.queueLength}`;
        const { loss, grad } = await lossAndGrad(c);
        const lossErr = Math.abs(loss - c.loss) / Math.abs(c.loss);
        assert.ok(lossErr < LOSS_TOLERANCE, `${label}: loss ${loss} vs ${c.loss} (rel ${lossErr})`);
        const gradErr = relativeError(grad, c.grad);
        assert.ok(gradErr < GRAD_TOLERANCE, `${label}: gradient rel err ${gradErr}`);
      }
    });
  });

  await t.step("no gradient flows through the codes (equals the loss with constant codes)", async () => {
    await assertNoTensorLeak("detached", async () => {
      const c = fixture.loss.find((x) => x.queueLength > 0 && x.nmbCrops.length > 1)!;
      const scores = tf.tensor2d(c.scores, [c.batchSize * total(c), c.k]);
      const queueScores = c.queueScores!.map((q) => tf.tensor2d(q, [c.queueLength, c.k]));
      const options = { ...c, queueScores };
      const codes = assignmentCodes(scores, options);
      const [composed, fromCodes] = tf.tidy(() => [
        tf.grad((s: tf.Tensor) => swappedPredictionLoss(s as tf.Tensor2D, options))(scores),
        tf.grad((s: tf.Tensor) => swappedLossFromCodes(s as tf.Tensor2D, codes, options))(scores),
      ]);
      const [a, b] = [await values(composed!), await values(fromCodes!)];
      tf.dispose([scores, ...queueScores, ...codes, composed!, fromCodes!]);
      assert.ok(relativeError(a, b) < 1e-6, `rel err ${relativeError(a, b)}`);
    });
  });

  await t.step(
    "fresh random scores and codes: equals a float64 transcription of the reference loop",
    async () => {
      await assertNoTensorLeak("random", async () => {
        await fc.assert(
          fc.asyncProperty(
            fc.integer({ min: 1, max: 6 }),
            fc.constantFrom([2], [2, 3], [2, 6], [3]),
            fc.integer({ min: 2, max: 20 }),
            fc.constantFrom(0.1, 0.2, 0.05),
            fc.integer(),
            async (bs, nmbCrops, k, temperature, seed) => {
              const n = total({ nmbCrops });
              const cropsForAssign = seed % 2 === 0 ? [0, 1] : [1];
              const scores = tf.randomUniform([bs * n, k], -1, 1, "float32", seed) as tf.Tensor2D;
              const codes = cropsForAssign.map((_, i) =>
                tf.tidy(() =>
                  tf.softmax(tf.randomNormal([bs, k], 0, 2, "float32", seed + i + 1)) as tf.Tensor2D
                )
              );
              const loss = swappedLossFromCodes(scores, codes, {
                batchSize: bs,
                nmbCrops,
                cropsForAssign,
                temperature,
              });
              const got = (await values(loss))[0]!;
              const s = await values(scores);
              const q = await Promise.all(codes.map(values));
              tf.dispose([scores, loss, ...codes]);
              const ref = loss64(s, q, bs, k, n, cropsForAssign, temperature);
              assert.ok(Math.abs(got - ref) / Math.abs(ref) < LOSS_TOLERANCE, `loss ${got} vs ${ref}`);
            },
          ),
          { numRuns: 40 },
        );
      });
    },
  );

  await t.step("a layout that does not fit the scores is a CropLayoutError naming the problem", () => {
    const scores = tf.zeros([12, 5]) as tf.Tensor2D;
    const base = {
      batchSize: 4,
      nmbCrops: [2],
      cropsForAssign: [0, 1],
      temperature: 0.1,
      epsilon: 0.05,
      iterations: 3,
    };
    assert.throws(
      () => swappedPredictionLoss(scores, base),
      (e) => e instanceof CropLayoutError && /rows/.test(e.message),
    );
    assert.throws(
      () => swappedPredictionLoss(scores, { ...base, batchSize: 6, cropsForAssign: [0, 2] }),
      (e) => e instanceof CropLayoutError && /cropsForAssign/.test(e.message),
    );
    scores.dispose();
  });
});

Deno.test("swappedLoss stage", async (t) => {
  await t.step("takes scores and codes; defaults temperature 0.1, crops [0, 1] of 2", async () => {
    const c = fixture.loss.find((x) =>
      x.queueLength === 0 && x.nmbCrops.length === 1 && x.temperature === 0.1
    )!;
    const step = await Effect.runPromise(configure(swappedLossStage, {}));
    await assertNoTensorLeak("stage", async () => {
      const scores = tf.tensor2d(c.scores, [c.batchSize * total(c), c.k]);
      const codes = assignmentCodes(scores, { ...c, queueScores: undefined });
      const loss = await Effect.runPromise(
        Effect.scoped(Effect.flatMap(step({ scores, codes }), (l) => Effect.promise(() => values(l)))),
      );
      tf.dispose([scores, ...codes]);
      assert.ok(Math.abs(loss[0]! - c.loss) / c.loss < LOSS_TOLERANCE);
    });
  });

  await t.step("fails with CropLayoutError when the rows do not divide into crops", async () => {
    const step = await Effect.runPromise(configure(swappedLossStage, { nmbCrops: [2, 4] }));
    const scores = tf.zeros([10, 3]) as tf.Tensor2D;
    const exit = await Effect.runPromiseExit(Effect.scoped(step({ scores, codes: [] })));
    scores.dispose();
    assert.ok(Exit.isFailure(exit));
    assert.match(String(exit.cause), /CropLayoutError/);
  });

  await t.step("a bad config names the field", async () => {
    for (
      const [raw, field] of [
        [{ temperature: 0 }, "temperature"],
        [{ cropsForAssign: [-1] }, "cropsForAssign"],
        [{ nmbCrops: [2], cropsForAssign: [0, 2] }, "cropsForAssign"],
        [{ nmbCrops: [1] }, "nmbCrops"],
      ] as const
    ) {
      const exit = await Effect.runPromiseExit(configure(swappedLossStage, raw));
      assert.ok(Exit.isFailure(exit));
      assert.match(String(exit.cause), new RegExp(field));
    }
  });
});
