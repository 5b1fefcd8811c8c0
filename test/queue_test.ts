import * as tf from "@tensorflow/tfjs";
import assert from "node:assert/strict";
import fc from "fast-check";
import { Effect, Exit } from "effect";
import { initBackend, resolveBackendName } from "../backend/tensor_backend.ts";
import { initPrototypes, normalisePrototypes, prototypeScores } from "../models/prototypes.ts";
import {
  createQueue,
  effectiveQueueLength,
  isFull,
  makeQueue,
  push,
  queueActiveAt,
  queueScores,
  restore,
  scoresThenPush,
  serialise,
} from "../state/queue.ts";
import { assertNoTensorLeak, relativeError, values } from "./_helpers.ts";

await initBackend(await Effect.runPromise(resolveBackendName(undefined, "cpu")));

/** Float32 matrix products against float64 ones on |values| <= 1: relative error well below this. */
const SCORE_TOLERANCE = 1e-6;

const run = <A, E>(effect: Effect.Effect<A, E, never>) => Effect.runPromise(effect);

/** The reference's queue in plain arrays: rows of [dim] numbers, newest first. */
const modelPush = (queue: number[][], batch: number[][]): number[][] => [
  ...batch,
  ...queue.slice(0, queue.length - batch.length),
];

const rowsOf = (flat: ArrayLike<number>, dim: number): number[][] =>
  Array.from({ length: flat.length / dim }, (_, r) => Array.from(flat).slice(r * dim, (r + 1) * dim));

/** Float64 z · Wᵀ. */
const matMulT64 = (z: number[][], w: number[][]): number[] =>
  z.flatMap((zr) => w.map((wr) => zr.reduce((s, v, i) => s + v * wr[i]!, 0)));

Deno.test("queue geometry", async (t) => {
  await t.step("length is rounded down to a multiple of the batch; active from queueStartEpoch", () => {
    assert.equal(effectiveQueueLength(3840, 256), 3840);
    assert.equal(effectiveQueueLength(3840, 100), 3800);
    assert.equal(effectiveQueueLength(31, 32), 0);
    assert.equal(queueActiveAt(14, { queueLength: 3840, queueStartEpoch: 15 }), false);
    assert.equal(queueActiveAt(15, { queueLength: 3840, queueStartEpoch: 15 }), true);
    assert.equal(queueActiveAt(99, { queueLength: 0, queueStartEpoch: 15 }), false);
  });

  await t.step("a length that rounds to 0 is a QueueError", async () => {
    const exit = await Effect.runPromiseExit(
      Effect.scoped(makeQueue({ length: 10, batchSize: 16, dim: 4, cropsForAssign: [0, 1] })),
    );
    assert.ok(Exit.isFailure(exit));
    assert.match(String(exit.cause), /QueueError.*rounds down to 0/s);
  });
});

Deno.test("embedding queue", async (t) => {
  await t.step(
    "FIFO push per assignment crop, full after length / bs pushes (fresh random batches)",
    async () => {
      await assertNoTensorLeak("fifo", async () => {
        await fc.assert(
          fc.asyncProperty(
            fc.integer({ min: 1, max: 4 }),
            fc.integer({ min: 1, max: 4 }),
            fc.integer({ min: 0, max: 3 }),
            fc.constantFrom([0, 1], [1], [0, 2]),
            fc.integer(),
            async (bs, batches, extra, cropsForAssign, seed) => {
              const dim = 3;
              const totalCrops = 3;
              const length = bs * batches + (extra % bs); // rounded down to bs * batches
              await run(Effect.scoped(Effect.gen(function* () {
                const queue = yield* makeQueue({ length, batchSize: bs, dim, cropsForAssign });
                assert.equal(queue.length, bs * batches);
                let model = cropsForAssign.map(() => rowsOf(new Float32Array(queue.length * dim), dim));
                for (let step = 0; step < batches + 2; step++) {
                  assert.equal(yield* isFull(queue), step >= batches, `full at step ${step}`);
                  const embedding = tf.randomNormal(
                    [bs * totalCrops, dim],
                    0,
                    1,
                    "float32",
                    seed + step,
                  ) as tf.Tensor2D;
                  const rows = rowsOf(yield* Effect.promise(() => values(embedding)), dim);
                  yield* push(queue, embedding);
                  embedding.dispose();
                  model = model.map((q, i) =>
                    modelPush(q, rows.slice(cropsForAssign[i]! * bs, (cropsForAssign[i]! + 1) * bs))
                  );
                  const saved = yield* serialise(queue);
                  saved.embeddings.forEach((e, i) =>
                    assert.deepEqual(rowsOf(e, dim), model[i], `crop ${i} step ${step}`)
                  );
                }
              })));
            },
          ),
          { numRuns: 25 },
        );
      });
    },
  );

  await t.step("scores: none until full, then z · Wᵀ with the current prototypes", async () => {
    await assertNoTensorLeak("scores", async () => {
      const prototypes = initPrototypes({ dim: 4, k: 5, seed: 11, name: "queue_test/prototypes" });
      await run(Effect.scoped(Effect.gen(function* () {
        const queue = yield* makeQueue({ length: 6, batchSize: 3, dim: 4, cropsForAssign: [0, 1] });
        const batch = (seed: number) =>
          tf.tidy(() => tf.randomNormal([3 * 2, 4], 0, 1, "float32", seed).div(2) as tf.Tensor2D);
        const e1 = batch(1);
        assert.equal(yield* queueScores(queue, prototypes as tf.Tensor2D), undefined);
        const before = yield* scoresThenPush(queue, prototypes as tf.Tensor2D, e1);
        assert.equal(before, undefined, "not full: no scores");
        e1.dispose();
        const e2 = batch(2);
        yield* push(queue, e2);
        e2.dispose();
        assert.ok(yield* isFull(queue));
        for (const change of [false, true]) {
          if (change) {
            // the prototypes move (an optimiser step): the scores follow them
            tf.tidy(() =>
              prototypes.assign(tf.add(prototypes, tf.randomNormal([5, 4], 0, 0.5, "float32", 9)))
            );
            normalisePrototypes(prototypes);
          }
          const scores = (yield* queueScores(queue, prototypes as tf.Tensor2D))!;
          const saved = yield* serialise(queue);
          const w = rowsOf(yield* Effect.promise(() => values(prototypes)), 4);
          for (const [i, s] of scores.entries()) {
            assert.deepEqual(s.shape, [6, 5]);
            const ref = matMulT64(rowsOf(saved.embeddings[i]!, 4), w);
            const err = relativeError(yield* Effect.promise(() => values(s)), ref);
            assert.ok(err < SCORE_TOLERANCE, `crop ${i}: rel err ${err}`);
          }
        }
        // scoresThenPush gives the scores from before the push
        const expected = (yield* queueScores(queue, prototypes as tf.Tensor2D))!;
        const e3 = batch(3);
        const got = (yield* scoresThenPush(queue, prototypes as tf.Tensor2D, e3))!;
        e3.dispose();
        for (const [i, s] of got.entries()) {
          assert.deepEqual(
            yield* Effect.promise(() => values(s)),
            yield* Effect.promise(() => values(expected[i]!)),
          );
        }
        const after = yield* serialise(queue);
        assert.equal(after.filled, 6);
      })));
      prototypes.dispose();
    });
  });

  await t.step("serialise / restore round trip; the scope frees the tensors", async () => {
    await assertNoTensorLeak("restore", async () => {
      const options = { length: 8, batchSize: 2, dim: 3, cropsForAssign: [0, 1] };
      const saved = await run(Effect.scoped(Effect.gen(function* () {
        const queue = yield* makeQueue(options);
        for (let i = 0; i < 3; i++) {
          const e = tf.randomUniform([2 * 4, 3], -1, 1, "float32", i) as tf.Tensor2D;
          yield* push(queue, e);
          e.dispose();
        }
        return yield* serialise(queue);
      })));
      assert.equal(saved.filled, 6);
      const copy = structuredClone(saved);
      const reread = await run(Effect.scoped(Effect.gen(function* () {
        const queue = yield* makeQueue(options);
        yield* restore(queue, copy);
        assert.equal(yield* isFull(queue), false);
        return yield* serialise(queue);
      })));
      assert.deepEqual(reread, saved);
      // a different geometry is refused
      const exit = await Effect.runPromiseExit(Effect.scoped(Effect.gen(function* () {
        const queue = yield* makeQueue({ ...options, dim: 4 });
        yield* restore(queue, saved);
      })));
      assert.ok(Exit.isFailure(exit));
      assert.match(String(exit.cause), /QueueError/);
    });
  });

  await t.step("an embedding of the wrong shape is a QueueError", async () => {
    await assertNoTensorLeak("shape", async () => {
      const e = tf.zeros([4, 5]) as tf.Tensor2D;
      const exit = await Effect.runPromiseExit(Effect.scoped(Effect.gen(function* () {
        const queue = yield* makeQueue({ length: 8, batchSize: 4, dim: 3, cropsForAssign: [0, 1] });
        yield* push(queue, e);
      })));
      e.dispose();
      assert.ok(Exit.isFailure(exit));
      assert.match(String(exit.cause), /QueueError/);
    });
  });
});

Deno.test("prototypes", async (t) => {
  /** Fresh random [K, D] rows (one of them zero) against F.normalize in float64. */
  const checkNormalise = async (host: boolean) => {
    await assertNoTensorLeak("normalise", async () => {
      const seed = Date.now() % 100000;
      const [k, d] = [1 + (seed % 40), 1 + ((seed >> 3) % 130)];
      const w = tf.tidy(() =>
        tf.variable(tf.randomNormal([k, d], 0, 3, "float32", seed), true, "queue_test/w")
      );
      const before = rowsOf(await values(w), d);
      normalisePrototypes(w, { host });
      const after = await values(w);
      const ref = before.flatMap((r) => {
        const n = Math.hypot(...r);
        return r.map((v) => v / Math.max(n, 1e-12));
      });
      assert.ok(relativeError(after, ref) < 1e-6, `seed ${seed} [${k}, ${d}]: ${relativeError(after, ref)}`);
      // a zero row stays zero (divided by the 1e-12 floor, not NaN)
      tf.tidy(() => w.assign(tf.concat([tf.zeros([1, d]), w.slice([1, 0], [k - 1, d])])));
      normalisePrototypes(w, { host });
      assert.deepEqual([...(await values(w)).slice(0, d)], new Array(d).fill(0));
      w.dispose();
    });
  };

  await t.step(
    "normalisePrototypes: unit rows in place, as F.normalize (float64 check)",
    () => checkNormalise(true),
  );

  await t.step("on wasm: the heap pass and the tensor ops, each against float64", async () => {
    const previous = tf.getBackend();
    await initBackend("wasm");
    try {
      await checkNormalise(true);
      await checkNormalise(false);
    } finally {
      await tf.setBackend(previous);
    }
  });

  await t.step("normalising inside a tape records no gradient path; scores are z · Wᵀ", async () => {
    await assertNoTensorLeak("tape", async () => {
      const w = initPrototypes({ dim: 3, k: 4, seed: 2, name: "queue_test/tape" });
      const z = tf.randomNormal([2, 3], 0, 1, "float32", 3) as tf.Tensor2D;
      const { value, grads } = tf.variableGrads(() => {
        normalisePrototypes(w);
        return tf.sum(prototypeScores(z, w as tf.Tensor2D)) as tf.Scalar;
      }, [w]);
      // d/dW Σ z·Wᵀ = column sums of z, broadcast to every prototype
      const zSum = tf.sum(z, 0);
      const zs = await values(zSum);
      zSum.dispose();
      const g = await values(grads[w.name]!);
      assert.ok(relativeError(g, Array.from({ length: 4 }, () => [...zs]).flat()) < 1e-6);
      tf.dispose([value, grads[w.name]!, z, w]);
    });
  });
});

Deno.test("queue: `using` frees its tensors, pushed ones included (live tensor count back to where it was)", () => {
  const before = tf.memory().numTensors;
  {
    using queue = Effect.runSync(createQueue({ length: 6, batchSize: 3, dim: 4, cropsForAssign: [0, 1] }));
    assert.ok(tf.memory().numTensors > before);
    const z = tf.randomNormal([6, 4]) as tf.Tensor2D;
    Effect.runSync(push(queue, z));
    z.dispose();
  }
  assert.equal(tf.memory().numTensors, before, "live tensors back to where they were");
});
