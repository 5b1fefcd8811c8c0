import * as tf from "@tensorflow/tfjs";
import assert from "node:assert/strict";
import fc from "fast-check";
import { Effect, Exit } from "effect";
import { backendFromEnv, initBackend } from "../backend/tensor_backend.ts";
import { sinkhornKnopp, sinkhornStage } from "../stages/sinkhorn.ts";
import { configure } from "../stages/stage.ts";
import { assertNoTensorLeak, relativeError, values } from "./_helpers.ts";

interface SinkhornCase {
  rows: number;
  k: number;
  epsilon: number;
  iterations: number;
  source: string;
  scores: number[];
  codes: number[];
}
const fixture = JSON.parse(await Deno.readTextFile(new URL("./fixtures/core.json", import.meta.url))) as {
  sinkhorn: SinkhornCase[];
};

await initBackend(backendFromEnv() ?? "cpu");

/**
 * Norm-wise relative error allowed against float64: float32 rounding of the
 * inputs (~6e-8 relative) is amplified by |s|/eps in the codes (exp(s/eps - ...)),
 * plus float32 accumulation. Measured: 1e-7 to 4e-7 over the fixtures, up to 1.5e-5 at eps 0.001 on
 * random inputs (worst case about one float32 ulp of |s|/eps, 6e-5 at eps 0.001).
 */
const tolerance = (epsilon: number): number => 1e-6 + 1e-7 / epsilon;

/** Float64 log-domain Sinkhorn on a row-major [b, k] array: independent of tf. */
const sinkhorn64 = (
  scores: ArrayLike<number>,
  b: number,
  k: number,
  eps: number,
  iters: number,
): Float64Array => {
  const lq = Float64Array.from(scores, (s) => s / eps);
  const lse = (indices: number[]): number => {
    let m = -Infinity;
    for (const i of indices) m = Math.max(m, lq[i]!);
    let s = 0;
    for (const i of indices) s += Math.exp(lq[i]! - m);
    return m + Math.log(s);
  };
  const all = [...Array(b * k).keys()];
  const g = lse(all);
  for (let i = 0; i < lq.length; i++) lq[i]! -= g;
  const col = (j: number) => [...Array(b).keys()].map((r) => r * k + j);
  const row = (r: number) => [...Array(k).keys()].map((j) => r * k + j);
  for (let it = 0; it < iters; it++) {
    for (let j = 0; j < k; j++) {
      const idx = col(j);
      const c = lse(idx) + Math.log(k);
      for (const i of idx) lq[i]! -= c;
    }
    for (let r = 0; r < b; r++) {
      const idx = row(r);
      const c = lse(idx) + Math.log(b);
      for (const i of idx) lq[i]! -= c;
    }
  }
  return lq.map((v) => Math.exp(v + Math.log(b)));
};

const scoresArb = (maxRows: number, maxK: number) =>
  fc.tuple(fc.integer({ min: 2, max: maxRows }), fc.integer({ min: 2, max: maxK })).chain(([b, k]) =>
    fc.record({
      b: fc.constant(b),
      k: fc.constant(k),
      scores: fc.array(fc.double({ min: -1, max: 1, noNaN: true }), { minLength: b * k, maxLength: b * k }),
    })
  );

Deno.test("sinkhornKnopp", async (t) => {
  await t.step("matches the float64 reference fixtures (direct and log-domain)", async () => {
    await assertNoTensorLeak("fixtures", async () => {
      assert.ok(fixture.sinkhorn.some((c) => c.source === "log-domain" && c.epsilon <= 0.001));
      for (const c of fixture.sinkhorn) {
        const scores = tf.tensor2d(c.scores, [c.rows, c.k]);
        const codes = sinkhornKnopp(scores, { epsilon: c.epsilon, iterations: c.iterations });
        const got = await values(codes);
        tf.dispose([scores, codes]);
        const err = relativeError(got, c.codes);
        assert.ok(
          err < tolerance(c.epsilon),
          `B=${c.rows} K=${c.k} eps=${c.epsilon} it=${c.iterations}: rel err ${err} >= ${
            tolerance(c.epsilon)
          }`,
        );
      }
    });
  });

  await t.step("fresh random scores: equals a float64 log-domain iteration, rows sum to 1", async () => {
    await assertNoTensorLeak("random", async () => {
      await fc.assert(
        fc.asyncProperty(
          scoresArb(40, 40),
          fc.constantFrom(0.1, 0.05, 0.02, 0.005, 0.001),
          fc.integer({ min: 1, max: 6 }),
          async ({ b, k, scores }, epsilon, iterations) => {
            const input = tf.tensor2d(scores, [b, k]);
            const codes = sinkhornKnopp(input, { epsilon, iterations });
            const got = await values(codes);
            tf.dispose([input, codes]);
            // the reference in float64 on the same float32-rounded inputs
            const ref = sinkhorn64(Float32Array.from(scores), b, k, epsilon, iterations);
            const err = relativeError(got, ref);
            assert.ok(err < tolerance(epsilon), `b=${b} k=${k} eps=${epsilon}: rel err ${err}`);
            for (let r = 0; r < b; r++) {
              let sum = 0;
              for (let j = 0; j < k; j++) sum += got[r * k + j]!;
              assert.ok(Math.abs(sum - 1) < 1e-5, `row ${r} sums to ${sum}`);
            }
          },
        ),
        { numRuns: 60 },
      );
    });
  });

  await t.step("column marginals converge to B/K (each prototype gets an equal share)", async () => {
    await assertNoTensorLeak("marginals", async () => {
      await fc.assert(
        fc.asyncProperty(scoresArb(32, 16), async ({ b, k, scores }) => {
          const input = tf.tensor2d(scores, [b, k]);
          // eps 0.1 on |s| <= 1 converges fast; 300 iterations reach float32 precision
          const codes = sinkhornKnopp(input, { epsilon: 0.1, iterations: 300 });
          const colSums = tf.sum(codes, 0);
          const got = await values(colSums);
          tf.dispose([input, codes, colSums]);
          for (let j = 0; j < k; j++) {
            assert.ok(Math.abs(got[j]! - b / k) < 1e-3 * (b / k), `column ${j}: ${got[j]} vs ${b / k}`);
          }
        }),
        { numRuns: 25 },
      );
    });
  });

  await t.step("invariant to adding a constant to all scores", async () => {
    await assertNoTensorLeak("shift", async () => {
      await fc.assert(
        fc.asyncProperty(
          scoresArb(24, 24),
          fc.double({ min: -5, max: 5, noNaN: true }),
          fc.constantFrom(0.05, 0.01),
          async ({ b, k, scores }, shift, epsilon) => {
            const input = tf.tensor2d(scores, [b, k]);
            const shifted = tf.add(input, shift) as tf.Tensor2D;
            const a = sinkhornKnopp(input, { epsilon, iterations: 3 });
            const c = sinkhornKnopp(shifted, { epsilon, iterations: 3 });
            const [va, vc] = [await values(a), await values(c)];
            tf.dispose([input, shifted, a, c]);
            // the shift is rounded to float32 with the scores: |s + c| <= 6
            const err = relativeError(vc, va);
            assert.ok(err < 6 * 2e-7 / epsilon + 1e-6, `shift ${shift}: rel err ${err}`);
          },
        ),
        { numRuns: 30 },
      );
    });
  });

  await t.step("finite at epsilon 0.001, even with scores at ±1", async () => {
    await assertNoTensorLeak("finite", async () => {
      await fc.assert(
        fc.asyncProperty(
          scoresArb(64, 64),
          fc.integer({ min: 1, max: 10 }),
          async ({ b, k, scores }, iterations) => {
            const extreme = scores.map((s) => (s > 0.5 ? 1 : s < -0.5 ? -1 : s));
            const input = tf.tensor2d(extreme, [b, k]);
            const codes = sinkhornKnopp(input, { epsilon: 0.001, iterations });
            const got = await values(codes);
            tf.dispose([input, codes]);
            assert.ok(got.every(Number.isFinite), "non-finite code");
            assert.ok(got.every((v) => v >= 0 && v <= 1 + 1e-5), "code outside [0, 1]");
          },
        ),
        { numRuns: 30 },
      );
    });
  });

  await t.step("carries no gradient and records nothing on the tape", async () => {
    await assertNoTensorLeak("gradient", async () => {
      const scores = tf.randomUniform([6, 5], -1, 1, "float32", 7) as tf.Tensor2D;
      const weight = tf.randomUniform([6, 5], 0, 1, "float32", 8);
      // d/ds [Σ codes(s)·w + Σ s] is exactly ones when no gradient flows through the codes.
      const grad = tf.grad((s: tf.Tensor) =>
        tf.add(
          tf.sum(tf.mul(sinkhornKnopp(s as tf.Tensor2D, { epsilon: 0.05, iterations: 3 }), weight)),
          tf.sum(s),
        )
      )(scores);
      const g = await values(grad);
      tf.dispose([scores, weight, grad]);
      assert.deepEqual([...g], new Array(30).fill(1));
    });
  });

  await t.step("0 iterations returns the globally normalised Q times B, as the reference", async () => {
    const c = fixture.sinkhorn.find((x) => x.iterations === 0)!;
    await assertNoTensorLeak("zero iterations", async () => {
      const scores = tf.tensor2d(c.scores, [c.rows, c.k]);
      const codes = sinkhornKnopp(scores, { epsilon: c.epsilon, iterations: 0 });
      const total = tf.sum(codes);
      const sum = (await values(total))[0]!;
      tf.dispose([scores, codes, total]);
      assert.ok(Math.abs(sum - c.rows) < 1e-4 * c.rows, `total ${sum} vs ${c.rows}`);
    });
  });
});

Deno.test("sinkhorn stage", async (t) => {
  await t.step("defaults are the reference's", async () => {
    // an empty config must behave as epsilon 0.05, 3 iterations
    const step = await Effect.runPromise(configure(sinkhornStage, {}));
    await assertNoTensorLeak("stage", async () => {
      const c = fixture.sinkhorn.find((x) => x.epsilon === 0.05 && x.iterations === 3)!;
      const scores = tf.tensor2d(c.scores, [c.rows, c.k]);
      const got = await Effect.runPromise(
        Effect.scoped(Effect.flatMap(step(scores), (codes) => Effect.promise(() => values(codes)))),
      );
      scores.dispose();
      assert.ok(relativeError(got, c.codes) < tolerance(c.epsilon));
    });
  });

  await t.step("a bad config names the field", async () => {
    for (const [raw, field] of [[{ epsilon: -1 }, "epsilon"], [{ iterations: 1.5 }, "iterations"]] as const) {
      const exit = await Effect.runPromiseExit(configure(sinkhornStage, raw));
      assert.ok(Exit.isFailure(exit));
      assert.match(String(exit.cause), new RegExp(field));
    }
  });
});
