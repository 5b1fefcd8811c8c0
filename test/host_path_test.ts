/**
 * The path training takes, on the wasm backend: Sinkhorn on the wasm heap
 * (`hostCodes`' heap branch, not its `dataSync` one, which the cpu-backend
 * tests reach), the swapped loss over it, the queue and an optimise step (the
 * fused LARC update), each against a float64 reference written here, on fresh
 * random inputs (the seed is in every message).
 *
 * The file asserts that the host path is active rather than skipping when it
 * is not: wasm ships with TF.js, so it is always there.
 */
import * as tf from "@tensorflow/tfjs";
import assert from "node:assert/strict";
import { Effect } from "effect";
import { hostBackendActive, plainDomainCodes } from "../backend/sinkhorn_host.ts";
import { wasmHeap } from "../backend/wasm_heap.ts";
import { rngFor } from "../data/rng.ts";
import { sinkhornKnopp, sinkhornStage } from "../stages/sinkhorn.ts";
import { swappedPredictionLoss } from "../stages/swapped_loss.ts";
import { LarcSgd, type LarcSgdOptions, optimiseStage } from "../stages/optimise.ts";
import { configure } from "../stages/stage.ts";
import { makeQueue, push, queueScores, serialise } from "../state/queue.ts";
import { assertNoTensorLeak, relativeError, useBackend, values } from "./_helpers.ts";

await useBackend("wasm");

const seed = Date.now() % 1_000_000;
const random = rngFor(seed);
const uniforms = (n: number, low = -1, high = 1): Float32Array =>
  Float32Array.from({ length: n }, () => random.uniform(low, high));

/** Unit-norm rows (as the embeddings and prototypes whose products are the scores). */
const unitRows = (rows: number, dim: number): Float32Array => {
  const x = uniforms(rows * dim);
  for (let r = 0; r < rows; r++) {
    let ss = 0;
    for (let j = 0; j < dim; j++) ss += x[r * dim + j]! ** 2;
    for (let j = 0; j < dim; j++) x[r * dim + j] = x[r * dim + j]! / Math.sqrt(ss);
  }
  return x;
};

/**
 * The reference's `distributed_sinkhorn` (one process) in float64 on a
 * row-major [b, k] array, transcribed from it: Q = exp(s / eps)ᵀ, Q /= sum(Q);
 * `iters` times: rows of Q (prototypes) to sum 1/K, columns (samples) to 1/B;
 * Q *= B. In the log domain so that no exponential overflows.
 */
const sinkhorn64 = (scores: ArrayLike<number>, b: number, k: number, eps: number, iters: number) => {
  const lq = Float64Array.from(scores, (s) => s / eps);
  const logSumExp = (index: (t: number) => number, n: number): number => {
    let m = -Infinity;
    for (let t = 0; t < n; t++) m = Math.max(m, lq[index(t)]!);
    let s = 0;
    for (let t = 0; t < n; t++) s += Math.exp(lq[index(t)]! - m);
    return m + Math.log(s);
  };
  const g = logSumExp((t) => t, b * k);
  for (let i = 0; i < lq.length; i++) lq[i] = lq[i]! - g;
  for (let it = 0; it < iters; it++) {
    for (let j = 0; j < k; j++) {
      const c = logSumExp((r) => r * k + j, b) + Math.log(k);
      for (let r = 0; r < b; r++) lq[r * k + j] = lq[r * k + j]! - c;
    }
    for (let r = 0; r < b; r++) {
      const c = logSumExp((j) => r * k + j, k) + Math.log(b);
      for (let j = 0; j < k; j++) lq[r * k + j] = lq[r * k + j]! - c;
    }
  }
  return lq.map((v) => Math.exp(v + Math.log(b)));
};

/** The host path's error against float64: the float32 rounding of the codes (2^-24 relative an entry). */
const HOST_TOLERANCE = 2e-7;

Deno.test("the wasm backend's host path is active (the heap branch of hostCodes)", () => {
  assert.equal(tf.getBackend(), "wasm");
  assert.equal(hostBackendActive(), true);
  assert.notEqual(
    wasmHeap(),
    undefined,
    "the wasm heap is reachable, so hostCodes reads the scores in place",
  );
});

Deno.test(`Sinkhorn on the wasm heap equals float64 Sinkhorn-Knopp (seed ${seed})`, async () => {
  await assertNoTensorLeak("sinkhorn", async () => {
    for (const [b, k] of [[4, 3], [16, 10], [33, 7], [64, 30], [5, 120]] as const) {
      for (const epsilon of [0.05, 0.1]) {
        for (const iterations of [1, 3, 5]) {
          const scores = uniforms(b * k);
          const label = `seed ${seed}, [${b}, ${k}], eps ${epsilon}, ${iterations} iterations`;
          // These scores are inside the plain domain: the host path computes them, no log-domain fallback.
          assert.notEqual(plainDomainCodes(scores, b, k, { epsilon, iterations }), undefined, label);
          const input = tf.tensor2d(scores, [b, k]);
          const codes = sinkhornKnopp(input, { epsilon, iterations });
          const got = await values(codes);
          tf.dispose([input, codes]);
          const err = relativeError(got, sinkhorn64(scores, b, k, epsilon, iterations));
          assert.ok(err < HOST_TOLERANCE, `${label}: rel err ${err}`);
        }
      }
    }
  });
});

Deno.test(`sinkhorn stage on wasm: queue rows prepended, only the batch's codes kept (seed ${seed})`, async () => {
  await assertNoTensorLeak("stage", async () => {
    const assign = sinkhornStage.apply({ epsilon: 0.05, sinkhornIterations: 3 });
    for (const [bs, queueLength, k, cropsForAssign] of [[4, 8, 10, [0, 1]], [6, 12, 7, [0, 2]]] as const) {
      const nmbCrops = [2, 1];
      const total = 3;
      const scores = uniforms(bs * total * k);
      const queues = cropsForAssign.map(() => uniforms(queueLength * k));
      const scoresT = tf.tensor2d(scores, [bs * total, k]);
      const queueT = queues.map((q) => tf.tensor2d(q, [queueLength, k]));
      const codes = tf.tidy((): tf.Tensor2D[] => [
        ...assign({
          scores: scoresT,
          layout: { batchSize: bs, nmbCrops, cropsForAssign },
          queueScores: queueT,
        }),
      ]);
      for (const [i, crop] of cropsForAssign.entries()) {
        const withQueue = Float32Array.of(
          ...queues[i]!,
          ...scores.subarray(crop * bs * k, (crop + 1) * bs * k),
        );
        const want = sinkhorn64(withQueue, queueLength + bs, k, 0.05, 3).subarray(queueLength * k);
        assert.deepEqual(codes[i]!.shape, [bs, k]);
        const err = relativeError(await values(codes[i]!), want);
        assert.ok(err < HOST_TOLERANCE, `seed ${seed}, bs ${bs}, crop ${crop}: rel err ${err}`);
      }
      tf.dispose([scoresT, ...queueT, ...codes]);
    }
  });
});

/**
 * The reference's swapped loss and its gradient in float64: for each
 * assignment crop i, q = Sinkhorn(queue_i ⊕ scores of crop i)[last bs rows];
 * the loss is −mean over the other crops v of mean_b Σ_k q log softmax(s_v / T),
 * averaged over the assignment crops. The gradient treats q as constant:
 * ∂/∂s_v = (softmax(s_v / T) − q) / (T · bs · (V − 1) · n) summed over the i with crop_i ≠ v.
 */
const swappedLoss64 = (
  scores: Float32Array,
  queues: readonly Float32Array[] | undefined,
  o: { bs: number; k: number; total: number; cropsForAssign: readonly number[]; T: number; eps: number },
) => {
  const { bs, k, total, cropsForAssign, T } = o;
  const n = cropsForAssign.length;
  const codes = cropsForAssign.map((crop, i) => {
    const own = scores.subarray(crop * bs * k, (crop + 1) * bs * k);
    const q = queues?.[i];
    const rows = (q?.length ?? 0) / k + bs;
    const all = q === undefined ? own : Float32Array.of(...q, ...own);
    return sinkhorn64(all, rows, k, o.eps, 3).subarray((rows - bs) * k);
  });
  let loss = 0;
  const grad = new Float64Array(scores.length);
  for (let v = 0; v < total; v++) {
    for (let b = 0; b < bs; b++) {
      const row = (v * bs + b) * k;
      let m = -Infinity;
      for (let j = 0; j < k; j++) m = Math.max(m, scores[row + j]! / T);
      let z = 0;
      for (let j = 0; j < k; j++) z += Math.exp(scores[row + j]! / T - m);
      cropsForAssign.forEach((crop, i) => {
        if (crop === v) return;
        const scale = 1 / (bs * (total - 1) * n);
        for (let j = 0; j < k; j++) {
          const logP = scores[row + j]! / T - m - Math.log(z);
          const q = codes[i]![b * k + j]!;
          loss -= scale * q * logP;
          grad[row + j] = grad[row + j]! + (scale * (Math.exp(logP) - q)) / T;
        }
      });
    }
  }
  return { loss, grad };
};

/**
 * Loss float32 against float64: ~1e-7 relative measured; gradient norm-wise
 * ~2e-7 (the same bounds as the cpu fixture tests in swapped_loss_test.ts).
 */
const LOSS_TOLERANCE = 1e-6;
const GRAD_TOLERANCE = 1e-5;

Deno.test(
  `swapped prediction loss and gradient on wasm and cpu: small assignment crops, [0, 2], with and without a queue (seed ${seed})`,
  async () => {
    const layouts = [
      { nmbCrops: [2, 2], cropsForAssign: [0, 1] },
      { nmbCrops: [2, 2], cropsForAssign: [0, 2] }, // one large and one small crop, not contiguous
      { nmbCrops: [2, 3], cropsForAssign: [3] }, // a small crop alone
      { nmbCrops: [3, 2], cropsForAssign: [0, 2, 4] },
    ];
    try {
      for (const backend of ["wasm", "cpu"] as const) {
        await useBackend(backend);
        await assertNoTensorLeak(backend, async () => {
          for (const { nmbCrops, cropsForAssign } of layouts) {
            for (const queueLength of [0, 8]) {
              const [bs, k, T, eps] = [4, 12, 0.1, 0.05];
              const total = nmbCrops.reduce((a, b) => a + b, 0);
              const scores = unitRows(bs * total, 16).subarray(0, bs * total * 16);
              // scores as cosines: products of unit rows with unit prototypes
              const protos = unitRows(k, 16);
              const s = new Float32Array(bs * total * k);
              for (let r = 0; r < bs * total; r++) {
                for (let j = 0; j < k; j++) {
                  let dot = 0;
                  for (let d = 0; d < 16; d++) dot += scores[r * 16 + d]! * protos[j * 16 + d]!;
                  s[r * k + j] = dot;
                }
              }
              const queues = queueLength === 0
                ? undefined
                : cropsForAssign.map(() => uniforms(queueLength * k));
              const label =
                `${backend}, seed ${seed}, crops [${nmbCrops}], assign [${cropsForAssign}], queue ${queueLength}`;
              const scoresT = tf.tensor2d(s, [bs * total, k]);
              const queueT = queues?.map((q) => tf.tensor2d(q, [queueLength, k]));
              const options = {
                batchSize: bs,
                nmbCrops,
                cropsForAssign,
                temperature: T,
                epsilon: eps,
                iterations: 3,
                queueScores: queueT,
              };
              const { value, grad } = tf.tidy(() =>
                tf.valueAndGrad((x: tf.Tensor) => swappedPredictionLoss(x as tf.Tensor2D, options))(scoresT)
              );
              const loss = (await values(value))[0]!;
              const g = await values(grad);
              tf.dispose([scoresT, value, grad, ...(queueT ?? [])]);
              const want = swappedLoss64(s, queues, { bs, k, total, cropsForAssign, T, eps });
              const lossErr = Math.abs(loss - want.loss) / Math.abs(want.loss);
              assert.ok(lossErr < LOSS_TOLERANCE, `${label}: loss ${loss} vs ${want.loss} (rel ${lossErr})`);
              const gradErr = relativeError(g, want.grad);
              assert.ok(gradErr < GRAD_TOLERANCE, `${label}: gradient rel err ${gradErr}`);
            }
          }
        });
      }
    } finally {
      await useBackend("wasm");
    }
  },
);

Deno.test(`queue on wasm: FIFO per assignment crop, scores z · Wᵀ in float64 (seed ${seed})`, async () => {
  await assertNoTensorLeak("queue", async () => {
    const [bs, dim, k, length, total] = [3, 5, 7, 9, 4];
    const cropsForAssign = [0, 2];
    await Effect.runPromise(Effect.scoped(Effect.gen(function* () {
      const queue = yield* makeQueue({ length, batchSize: bs, dim, cropsForAssign });
      // The model: newest batch first, the oldest dropped.
      let model = cropsForAssign.map(() => new Float64Array(length * dim));
      const prototypes = unitRows(k, dim);
      const w = tf.tensor2d(prototypes, [k, dim]);
      for (let step = 0; step < 5; step++) {
        const z = unitRows(bs * total, dim);
        const zt = tf.tensor2d(z, [bs * total, dim]);
        yield* push(queue, zt);
        zt.dispose();
        model = model.map((old, i) => {
          const next = new Float64Array(length * dim);
          next.set(z.subarray(cropsForAssign[i]! * bs * dim, (cropsForAssign[i]! + 1) * bs * dim));
          next.set(old.subarray(0, (length - bs) * dim), bs * dim);
          return next;
        });
        const saved = yield* serialise(queue);
        saved.embeddings.forEach((e, i) =>
          assert.deepEqual([...e], [...model[i]!], `step ${step}, crop ${i}`)
        );
        const scores = yield* queueScores(queue, w);
        assert.equal(scores === undefined, step < 2, `full after ${length / bs} pushes`);
        for (const [i, sc] of (scores ?? []).entries()) {
          const want = new Float64Array(length * k);
          for (let r = 0; r < length; r++) {
            for (let j = 0; j < k; j++) {
              let dot = 0;
              for (let d = 0; d < dim; d++) dot += model[i]![r * dim + d]! * prototypes[j * dim + d]!;
              want[r * k + j] = dot;
            }
          }
          const err = relativeError(yield* Effect.promise(() => values(sc)), want);
          assert.ok(err < 1e-6, `seed ${seed}, step ${step}, crop ${i}: scores rel err ${err}`);
        }
      }
      w.dispose();
    })));
  });
});

/** apex LARC around torch SGD for one parameter, in float64 (independent of tf). */
const larcSgd64 = (
  p: Float64Array,
  g: ArrayLike<number>,
  buf: Float64Array,
  lr: number,
  o: LarcSgdOptions,
) => {
  let pn = 0;
  let gn = 0;
  for (let i = 0; i < p.length; i++) [pn, gn] = [pn + p[i]! ** 2, gn + g[i]! ** 2];
  [pn, gn] = [Math.sqrt(pn), Math.sqrt(gn)];
  const d = Float64Array.from(g);
  if (pn !== 0 && gn !== 0) {
    let a = (o.trustCoefficient * pn) / (gn + pn * o.weightDecay + o.eps);
    if (o.clip) a = Math.min(a / lr, 1);
    for (let i = 0; i < d.length; i++) d[i] = (d[i]! + o.weightDecay * p[i]!) * a;
  }
  for (let i = 0; i < d.length; i++) {
    buf[i] = o.momentum * buf[i]! + d[i]!;
    p[i] = p[i]! - lr * buf[i]!;
  }
};

Deno.test(`optimise stage on wasm: LARC + SGD steps equal float64 (seed ${seed})`, async () => {
  await assertNoTensorLeak("optimise", async () => {
    const raw = { baseLr: 0.5, finalLr: 0.005, warmupEpochs: 1, freezePrototypesIters: 2, trust: 0.02 };
    const step = await Effect.runPromise(configure(optimiseStage, raw));
    const shapes: Record<string, number[]> = { "head/kernel": [33, 17], "prototypes.weight": [12, 17] };
    const params = Object.fromEntries(
      Object.entries(shapes).map(([name, shape]) => [name, uniforms(shape[0]! * shape[1]!)]),
    );
    const variables = Object.fromEntries(
      Object.entries(shapes).map((
        [name, shape],
      ) => [name, tf.tidy(() => tf.variable(tf.tensor(params[name]!, shape)))]),
    );
    const p64 = Object.fromEntries(Object.entries(params).map(([name, p]) => [name, Float64Array.from(p)]));
    const buf64 = Object.fromEntries(
      Object.entries(params).map(([name, p]) => [name, new Float64Array(p.length)]),
    );
    const options: LarcSgdOptions = {
      momentum: 0.9,
      weightDecay: 1e-4,
      trustCoefficient: 0.02,
      eps: 1e-8,
      clip: false,
    };
    await Effect.runPromise(Effect.scoped(Effect.gen(function* () {
      const optimiser = new LarcSgd(options);
      for (let iteration = 0; iteration < 5; iteration++) {
        const g = Object.fromEntries(
          Object.entries(params).map(([name, p]) => [name, uniforms(p.length, -0.3, 0.3)]),
        );
        const grads = Object.fromEntries(
          Object.entries(shapes).map(([name, shape]) => [name, tf.tensor(g[name]!, shape)]),
        );
        const out = yield* step({ optimiser, variables, grads, iteration, itersPerEpoch: 4, epochs: 3 });
        tf.dispose(Object.values(grads));
        for (const name of Object.keys(shapes)) {
          if (name === "prototypes.weight" && out.prototypesFrozen) continue;
          larcSgd64(p64[name]!, g[name]!, buf64[name]!, out.learningRate, options);
        }
        for (const name of Object.keys(shapes)) {
          const got = yield* Effect.promise(() => values(variables[name]!));
          const err = relativeError(got, p64[name]!);
          assert.ok(err < 1e-6, `seed ${seed}, step ${iteration}, ${name}: rel err ${err}`);
        }
      }
      optimiser.dispose();
    })));
    tf.dispose(Object.values(variables));
  });
});
