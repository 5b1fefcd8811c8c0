import * as tf from "@tensorflow/tfjs";
import assert from "node:assert/strict";
import fc from "fast-check";
import { Effect, Exit } from "effect";
import { initBackend, resolveBackendName } from "../backend/tensor_backend.ts";
import { type ComputePath, sinkhornKnopp, sinkhornStage } from "../stages/sinkhorn.ts";
import { hostBackendActive, PLAIN_DOMAIN_MAX_SPREAD, plainDomainCodes } from "../backend/sinkhorn_host.ts";
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

await initBackend(await Effect.runPromise(resolveBackendName(undefined, "cpu")));

/**
 * Both implementations, run by every property below: "auto" is the float64 host
 * path on the wasm and cpu backends (the default here is cpu; SWAV_BACKEND=wasm
 * runs the file on wasm), and "tensor" forces the log-domain tensor-op path.
 */
const paths: readonly ComputePath[] = ["auto", "tensor"];
const label = (path: ComputePath): string =>
  path === "tensor" ? "tensor path" : hostBackendActive() ? "host path" : "auto (tensor) path";

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

const scoresArb = (maxRows: number, maxK: number, minSize = 2) =>
  fc.tuple(fc.integer({ min: minSize, max: maxRows }), fc.integer({ min: minSize, max: maxK })).chain((
    [b, k],
  ) =>
    fc.record({
      b: fc.constant(b),
      k: fc.constant(k),
      scores: fc.array(fc.double({ min: -1, max: 1, noNaN: true }), { minLength: b * k, maxLength: b * k }),
    })
  );

/** The codes of `scores` [b, k] by `path`, read back as float64; no tensor is left. */
const codesOf = async (
  scores: ArrayLike<number>,
  b: number,
  k: number,
  options: { epsilon: number; iterations: number },
  path: ComputePath,
): Promise<Float64Array> => {
  const input = tf.tensor2d(Float32Array.from(scores), [b, k]);
  const codes = sinkhornKnopp(input, options, path);
  const got = await values(codes);
  tf.dispose([input, codes]);
  return got;
};

/** Whether the host path computes these scores itself (no fallback to the log domain). */
const hostComputes = (scores: ArrayLike<number>, b: number, k: number, epsilon: number): boolean =>
  hostBackendActive() &&
  plainDomainCodes(Float32Array.from(scores), b, k, { epsilon, iterations: 1 }) !== undefined;

/**
 * Norm-wise relative error allowed for the host path against float64: the
 * iteration runs in float64 (~1e-13 here), so what remains is the float32
 * rounding of the output, at most 2^-24 ≈ 6e-8 relative per entry.
 */
const HOST_TOLERANCE = 1e-7;

/**
 * The tensor path's error against float64 at 0 iterations, where no final
 * softmax re-normalises the rows: the codes are exp(log Q + log B) with log Q in
 * float32, of magnitude up to (max − min) / eps + log(B·K), and a few roundings
 * of that exponent (each ≤ 2^-24 of it) become relative errors of the codes.
 * Measured: up to 4.2e-6 on wasm for sparse scores at ±1 ([20, 20], eps 0.1),
 * where tolerance(0.1) is 2e-6 and this bound 7.9e-6.
 */
const zeroIterationTolerance = (scores: readonly number[], b: number, k: number, epsilon: number): number => {
  const f = Float32Array.from(scores);
  const spread = (Math.max(...f) - Math.min(...f)) / epsilon;
  return 1e-6 + 4 * 2 ** -24 * (spread + Math.log(b * k) + Math.log(b));
};

Deno.test("sinkhornKnopp", async (t) => {
  for (const path of paths) {
    await t.step(
      `${label(path)}: matches the float64 reference fixtures (direct and log-domain)`,
      async () => {
        await assertNoTensorLeak("fixtures", async () => {
          assert.ok(fixture.sinkhorn.some((c) => c.source === "log-domain" && c.epsilon <= 0.001));
          for (const c of fixture.sinkhorn) {
            const got = await codesOf(c.scores, c.rows, c.k, c, path);
            const err = relativeError(got, c.codes);
            assert.ok(
              err < tolerance(c.epsilon),
              `B=${c.rows} K=${c.k} eps=${c.epsilon} it=${c.iterations}: rel err ${err} >= ${
                tolerance(c.epsilon)
              }`,
            );
            if (path === "auto" && hostComputes(c.scores, c.rows, c.k, c.epsilon)) {
              // against float64 on the same float32-rounded scores: only the output's rounding remains
              const ref = sinkhorn64(Float32Array.from(c.scores), c.rows, c.k, c.epsilon, c.iterations);
              const hostErr = relativeError(got, ref);
              assert.ok(hostErr < HOST_TOLERANCE, `host B=${c.rows} K=${c.k} eps=${c.epsilon}: ${hostErr}`);
            }
          }
        });
      },
    );
  }

  await t.step(
    "fresh random scores: both paths equal a float64 log-domain iteration, rows sum to 1",
    async () => {
      await assertNoTensorLeak("random", async () => {
        await fc.assert(
          fc.asyncProperty(
            scoresArb(40, 40, 1),
            fc.constantFrom(0.1, 0.05, 0.02, 0.005, 0.001),
            fc.integer({ min: 1, max: 6 }),
            async ({ b, k, scores }, epsilon, iterations) => {
              // the reference in float64 on the same float32-rounded inputs
              const ref = sinkhorn64(Float32Array.from(scores), b, k, epsilon, iterations);
              for (const path of paths) {
                const got = await codesOf(scores, b, k, { epsilon, iterations }, path);
                const err = relativeError(got, ref);
                // the host path, where it computes, is float64 up to the output's float32 rounding
                const bound = path === "auto" && hostComputes(scores, b, k, epsilon)
                  ? HOST_TOLERANCE
                  : tolerance(epsilon);
                assert.ok(
                  err < bound,
                  `${label(path)} b=${b} k=${k} eps=${epsilon}: rel err ${err} >= ${bound}`,
                );
                for (let r = 0; r < b; r++) {
                  let sum = 0;
                  for (let j = 0; j < k; j++) sum += got[r * k + j]!;
                  assert.ok(Math.abs(sum - 1) < 1e-5, `${label(path)}: row ${r} sums to ${sum}`);
                }
              }
            },
          ),
          { numRuns: 60 },
        );
      });
    },
  );

  await t.step(
    "host and log-domain tensor paths agree, iterations 0 and B = 1 or K = 1 included",
    async () => {
      await assertNoTensorLeak("host vs tensor", async () => {
        await fc.assert(
          fc.asyncProperty(
            scoresArb(24, 24, 1),
            fc.constantFrom(0.1, 0.05, 0.02, 0.01, 0.005),
            fc.integer({ min: 0, max: 5 }),
            async ({ b, k, scores }, epsilon, iterations) => {
              const ref = sinkhorn64(Float32Array.from(scores), b, k, epsilon, iterations);
              const host = await codesOf(scores, b, k, { epsilon, iterations }, "auto");
              const tensor = await codesOf(scores, b, k, { epsilon, iterations }, "tensor");
              // Each against float64: the host path (computing itself here, spread / eps
              // <= 400) to its output's float32 rounding, the tensor path to the rounding
              // of its float32 exponents, amplified by exp.
              const tensorBound = iterations === 0
                ? zeroIterationTolerance(scores, b, k, epsilon)
                : tolerance(epsilon);
              if (hostBackendActive()) {
                const hostErr = relativeError(host, ref);
                assert.ok(
                  hostErr < HOST_TOLERANCE,
                  `host b=${b} k=${k} eps=${epsilon} it=${iterations}: ${hostErr}`,
                );
              }
              const tensorErr = relativeError(tensor, ref);
              assert.ok(
                tensorErr < tensorBound,
                `tensor b=${b} k=${k} eps=${epsilon} it=${iterations}: ${tensorErr}`,
              );
              // and so to each other, within the sum of the two
              const err = relativeError(host, tensor);
              const bound = tensorBound + HOST_TOLERANCE;
              assert.ok(err < bound, `b=${b} k=${k} eps=${epsilon} it=${iterations}: ${err} >= ${bound}`);
              if (iterations === 0) {
                // Q · B after the global normalisation: the entries sum to B
                const total = host.reduce((a, x) => a + x, 0);
                assert.ok(Math.abs(total - b) < 1e-5 * b, `total ${total} vs ${b}`);
              }
            },
          ),
          { numRuns: 80 },
        );
        // the edge cases, explicitly: a single sample, a single prototype, both
        for (const [b, k] of [[1, 7], [9, 1], [1, 1]] as const) {
          const scores = Array.from({ length: b * k }, (_, i) => Math.sin(3 * i + 1));
          for (const iterations of [0, 1, 3]) {
            const ref = sinkhorn64(Float32Array.from(scores), b, k, 0.05, iterations);
            for (const path of paths) {
              const got = await codesOf(scores, b, k, { epsilon: 0.05, iterations }, path);
              const err = relativeError(got, ref);
              assert.ok(err < tolerance(0.05), `${label(path)} [${b}, ${k}] it=${iterations}: ${err}`);
            }
          }
        }
      });
    },
  );

  await t.step("the host path falls back to the log domain where the plain one could underflow", async () => {
    await assertNoTensorLeak("fallback", async () => {
      // eps 0.001 with scores spanning ±1: (max − min) / eps = 2000 > 600
      const b = 16;
      const k = 24;
      const scores = Array.from({ length: b * k }, (_, i) => (i === 0 ? 1 : i === 1 ? -1 : Math.sin(7 * i)));
      const options = { epsilon: 0.001, iterations: 3 };
      assert.equal(plainDomainCodes(Float32Array.from(scores), b, k, options), undefined);
      const auto = await codesOf(scores, b, k, options, "auto");
      const tensor = await codesOf(scores, b, k, options, "tensor");
      assert.ok(auto.every(Number.isFinite), "non-finite code");
      assert.deepEqual([...auto], [...tensor]);
      // non-finite scores fall back too (to whatever the log domain gives)
      for (const bad of [NaN, Infinity, -Infinity]) {
        const withBad = Float32Array.from(scores.map((s) => s * 0.1));
        withBad[5] = bad;
        assert.equal(plainDomainCodes(withBad, b, k, { epsilon: 0.05, iterations: 3 }), undefined, `${bad}`);
      }
      // just inside the limit, the host path computes, to float32 rounding of float64
      const inside = { epsilon: 2 / (PLAIN_DOMAIN_MAX_SPREAD - 1), iterations: 4 };
      const codes = plainDomainCodes(Float32Array.from(scores), b, k, inside);
      assert.ok(codes !== undefined);
      const ref = sinkhorn64(Float32Array.from(scores), b, k, inside.epsilon, inside.iterations);
      assert.ok(relativeError(codes, ref) < HOST_TOLERANCE, `${relativeError(codes, ref)}`);
    });
  });

  await t.step(
    "sinkhornKnopp takes the host path on wasm and cpu: its codes are plainDomainCodes'",
    async () => {
      await assertNoTensorLeak("wiring", async () => {
        const scores = Array.from({ length: 12 * 10 }, (_, i) => Math.cos(5 * i));
        const options = { epsilon: 0.05, iterations: 3 };
        const expected = plainDomainCodes(Float32Array.from(scores), 12, 10, options)!;
        const got = await codesOf(scores, 12, 10, options, "auto");
        const tensor = await codesOf(scores, 12, 10, options, "tensor");
        if (hostBackendActive()) assert.deepEqual([...got], [...expected]);
        else assert.deepEqual([...got], [...tensor]);
        assert.notDeepEqual([...expected], [...tensor]); // the two paths round differently
      });
    },
  );

  await t.step("column marginals converge to B/K (each prototype gets an equal share)", async () => {
    await assertNoTensorLeak("marginals", async () => {
      await fc.assert(
        fc.asyncProperty(scoresArb(32, 16), async ({ b, k, scores }) => {
          for (const path of paths) {
            // 300 iterations at eps 0.1 reach float32 precision on most inputs, but the rate depends on the
            // scores' spread (exp(2 / eps) between extremes): a 4x4 case near +-1 is still 1e-3 off after 300.
            // So each column must be as close to B/K as exact float64 Sinkhorn after the same iterations is.
            const got = await codesOf(scores, b, k, { epsilon: 0.1, iterations: 300 }, path);
            const exact = sinkhorn64(scores, b, k, 0.1, 300);
            for (let j = 0; j < k; j++) {
              let col = 0;
              let exactCol = 0;
              for (let r = 0; r < b; r++) {
                col += got[r * k + j]!;
                exactCol += exact[r * k + j]!;
              }
              assert.ok(
                Math.abs(col - b / k) < Math.abs(exactCol - b / k) + 1e-3 * (b / k),
                `${label(path)} column ${j}: ${col} vs ${
                  b / k
                } (float64 after as many iterations: ${exactCol})`,
              );
            }
          }
        }),
        {
          numRuns: 25,
          // Slow to converge (found by a random run): the bound above must hold here too.
          examples: [[{
            b: 4,
            k: 4,
            scores: [
              0,
              -0.18596958369016647,
              0,
              0,
              0,
              0,
              0.6278723180294037,
              0,
              0,
              -0.9985394179821014,
              0,
              0,
              0,
              0.9999999701976776,
              0,
              0,
            ],
          }]],
        },
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
            for (const path of paths) {
              const input = tf.tensor2d(scores, [b, k]);
              const shifted = tf.add(input, shift) as tf.Tensor2D;
              const a = sinkhornKnopp(input, { epsilon, iterations: 3 }, path);
              const c = sinkhornKnopp(shifted, { epsilon, iterations: 3 }, path);
              const [va, vc] = [await values(a), await values(c)];
              tf.dispose([input, shifted, a, c]);
              // the shift is rounded to float32 with the scores: |s + c| <= 6
              const err = relativeError(vc, va);
              assert.ok(err < 6 * 2e-7 / epsilon + 1e-6, `${label(path)} shift ${shift}: rel err ${err}`);
            }
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
            for (const path of paths) {
              const got = await codesOf(extreme, b, k, { epsilon: 0.001, iterations }, path);
              assert.ok(got.every(Number.isFinite), `${label(path)}: non-finite code`);
              assert.ok(got.every((v) => v >= 0 && v <= 1 + 1e-5), `${label(path)}: code outside [0, 1]`);
            }
          },
        ),
        { numRuns: 30 },
      );
    });
  });

  for (const path of paths) {
    await t.step(`${label(path)}: carries no gradient and records nothing on the tape`, async () => {
      await assertNoTensorLeak("gradient", async () => {
        const scores = tf.randomUniform([6, 5], -1, 1, "float32", 7) as tf.Tensor2D;
        const weight = tf.randomUniform([6, 5], 0, 1, "float32", 8);
        // d/ds [Σ codes(s)·w + Σ s] is exactly ones when no gradient flows through the codes.
        const grad = tf.grad((s: tf.Tensor) =>
          tf.add(
            tf.sum(tf.mul(sinkhornKnopp(s as tf.Tensor2D, { epsilon: 0.05, iterations: 3 }, path), weight)),
            tf.sum(s),
          )
        )(scores);
        const g = await values(grad);
        tf.dispose([scores, weight, grad]);
        assert.deepEqual([...g], new Array(30).fill(1));
      });
    });
  }

  await t.step("0 iterations returns the globally normalised Q times B, as the reference", async () => {
    const c = fixture.sinkhorn.find((x) => x.iterations === 0)!;
    await assertNoTensorLeak("zero iterations", async () => {
      for (const path of paths) {
        const got = await codesOf(c.scores, c.rows, c.k, { epsilon: c.epsilon, iterations: 0 }, path);
        const sum = got.reduce((a, x) => a + x, 0);
        assert.ok(Math.abs(sum - c.rows) < 1e-4 * c.rows, `${label(path)}: total ${sum} vs ${c.rows}`);
      }
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
        Effect.scoped(Effect.flatMap(step({ scores }), (codes) => Effect.promise(() => values(codes[0]!)))),
      );
      scores.dispose();
      assert.ok(relativeError(got, c.codes) < tolerance(c.epsilon));
    });
  });

  await t.step("a bad config names the field", async () => {
    for (
      const [raw, field] of [[{ epsilon: -1 }, "epsilon"], [
        { sinkhornIterations: 1.5 },
        "sinkhornIterations",
      ]] as const
    ) {
      const exit = await Effect.runPromiseExit(configure(sinkhornStage, raw));
      assert.ok(Exit.isFailure(exit));
      assert.match(String(exit.cause), new RegExp(field));
    }
  });
});
