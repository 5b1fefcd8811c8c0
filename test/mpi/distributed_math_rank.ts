/**
 * One rank of test/distributed_math_test.ts (run under `mpiexec -n 2|4`):
 * distributed Sinkhorn and synchronised batch norm on this rank's shard of
 * one global batch, against float64 values of the whole batch.
 *
 * - Sinkhorn: the float64 host path and the log-domain tensor path, on the
 *   fixtures of reference/distributed_reference.py (main_swav.py's
 *   distributed_sinkhorn) and on fresh random scores against a float64
 *   transcription of the same iteration on the concatenated matrix.
 * - Batch norm: the oneDNN and the tensor-op paths, synchronised (against torch's
 *   batch norm on the concatenated batch: y, statistics, running statistics, dx,
 *   and dgamma/dbeta summed over the ranks) and not (against each shard's own
 *   batch norm, and shown to differ from the global one).
 */
import * as tf from "@tensorflow/tfjs";
import type { Communicator } from "../../backend/communicator.ts";
import { batchNormTrain } from "../../backend/batch_norm.ts";
import { nativeBatchNormActive } from "../../backend/batch_norm_kernels.ts";
import { loadDnnl } from "../../backend/onednn.ts";
import { plainDomainCodes } from "../../backend/sinkhorn_host.ts";
import { initBackend, withKernelSettings } from "../../backend/tensor_backend.ts";
import { batchNorm } from "../../models/resnet.ts";
import { type ComputePath, sinkhornKnopp } from "../../stages/sinkhorn.ts";
import { assertNoTensorLeak, relativeError } from "../_helpers.ts";
import { type Check, close, differs, runRank, seededRandom, testSeed } from "./_rank.ts";

interface SinkhornCase {
  readonly rows: number;
  readonly k: number;
  readonly epsilon: number;
  readonly iterations: number;
  readonly note: string;
  readonly scores: number[];
  readonly codes: number[];
}

interface BatchNormValues {
  readonly y: number[];
  readonly mean: number[];
  readonly variance: number[];
  readonly runningMean: number[];
  readonly runningVar: number[];
  readonly dx: number[];
  readonly dgamma: number[];
  readonly dbeta: number[];
}

interface BatchNormCase {
  readonly shape: number[];
  readonly relu: boolean;
  readonly epsilon: number;
  readonly momentum: number;
  /** Rows (first axis) of each rank, per world size. */
  readonly splits: Record<string, number[]>;
  readonly x: number[];
  readonly gamma: number[];
  readonly beta: number[];
  readonly dy: number[];
  readonly global: BatchNormValues;
  /** Each rank's own batch norm of its shard, per world size. */
  readonly local: Record<string, BatchNormValues[]>;
}

const fixture = JSON.parse(
  await Deno.readTextFile(new URL("../fixtures/distributed.json", import.meta.url)),
) as { sinkhorn: SinkhornCase[]; batchNorm: BatchNormCase[] };

// --- float64 references for fresh inputs -------------------------------------------

/** main_swav.py's distributed_sinkhorn on the whole [b, k] matrix, in float64 (world size 1). */
const sinkhorn64 = (scores: ArrayLike<number>, b: number, k: number, eps: number, iters: number) => {
  const q = Float64Array.from(scores, (s) => Math.exp(s / eps));
  const scale = (f: (i: number) => number) => q.forEach((v, i) => (q[i] = v * f(i)));
  const total = q.reduce((a, v) => a + v, 0);
  scale(() => 1 / total);
  for (let it = 0; it < iters; it++) {
    const cols = new Float64Array(k);
    q.forEach((v, i) => (cols[i % k]! += v));
    scale((i) => 1 / (cols[i % k]! * k));
    const rows = new Float64Array(b);
    q.forEach((v, i) => (rows[Math.floor(i / k)]! += v));
    scale((i) => 1 / (rows[Math.floor(i / k)]! * b));
  }
  scale(() => b);
  return q;
};

/** Batch norm (train mode) of [n, ..., C] values in float64, with the gradients of Σ y·dy. */
const batchNorm64 = (
  x: ArrayLike<number>,
  dy: ArrayLike<number>,
  gamma: ArrayLike<number>,
  beta: ArrayLike<number>,
  eps: number,
  relu: boolean,
) => {
  const c = gamma.length;
  const n = x.length / c;
  const mean = new Float64Array(c);
  const variance = new Float64Array(c);
  for (let i = 0; i < x.length; i++) mean[i % c]! += x[i]! / n;
  for (let i = 0; i < x.length; i++) variance[i % c]! += (x[i]! - mean[i % c]!) ** 2 / n;
  const s = variance.map((v) => 1 / Math.sqrt(v + eps));
  const xhat = Float64Array.from(x, (v, i) => (v - mean[i % c]!) * s[i % c]!);
  const y = xhat.map((h, i) => gamma[i % c]! * h + beta[i % c]!).map((v) => relu ? Math.max(0, v) : v);
  const g = Float64Array.from(dy, (d, i) => (relu && y[i]! <= 0 ? 0 : d));
  const dgamma = new Float64Array(c);
  const dbeta = new Float64Array(c);
  g.forEach((d, i) => {
    dgamma[i % c]! += d * xhat[i]!;
    dbeta[i % c]! += d;
  });
  const dx = g.map((d, i) =>
    gamma[i % c]! * s[i % c]! * (d - dbeta[i % c]! / n - xhat[i]! * dgamma[i % c]! / n)
  );
  return { y, mean, variance, dx, dgamma, dbeta, xhat, g };
};

// --- Sinkhorn ------------------------------------------------------------------------

/** Allowed norm-wise relative error against float64, as in test/sinkhorn_test.ts. */
const sinkhornTolerance = (epsilon: number): number => 1e-6 + 1e-7 / epsilon;

const sinkhornChecks = async (world: Communicator): Promise<Check[]> => {
  const random = seededRandom(testSeed());
  const b0 = 5;
  const k0 = 17;
  const freshScores = Array.from({ length: b0 * world.size * k0 }, () => 2 * random() - 1);
  const fresh: SinkhornCase = {
    rows: b0 * world.size,
    k: k0,
    epsilon: 0.05,
    iterations: 3,
    note: "fresh random scores",
    scores: freshScores,
    codes: [...sinkhorn64(freshScores, b0 * world.size, k0, 0.05, 3)],
  };
  const checks: Check[] = [];
  for (const c of [...fixture.sinkhorn, fresh]) {
    const b = c.rows / world.size;
    const mine = c.scores.slice(world.rank * b * c.k, (world.rank + 1) * b * c.k);
    const expected = c.codes.slice(world.rank * b * c.k, (world.rank + 1) * b * c.k);
    const options = { epsilon: c.epsilon, iterations: c.iterations };
    const label = `sinkhorn [${c.rows}x${c.k}] eps ${c.epsilon} it ${c.iterations} (${c.note})`;
    // The host iteration itself: it runs where the global spread allows, falls back on every rank otherwise.
    const spread = (Math.max(...c.scores) - Math.min(...c.scores)) / c.epsilon;
    const host = plainDomainCodes(Float32Array.from(mine), b, c.k, options);
    if (spread <= 600) {
      checks.push(close(`${label} plainDomainCodes`, host ?? [], expected, sinkhornTolerance(c.epsilon)));
    } else {checks.push({
        label: `${label} plainDomainCodes falls back`,
        error: host === undefined ? 0 : 1,
        tolerance: 1,
      });}
    // The global codes are not what this shard alone gives: a local Sinkhorn would fail the checks below.
    const alone = sinkhorn64(mine, b, c.k, c.epsilon, c.iterations);
    checks.push(differs(`${label} vs this shard's own Sinkhorn`, relativeError(alone, expected), 1e-3));
    for (const path of ["auto", "tensor"] as ComputePath[]) {
      const got = await assertNoTensorLeak(label, () => {
        const input = tf.tensor2d(Float32Array.from(mine), [b, c.k]);
        const codes = sinkhornKnopp(input, options, path);
        const values = codes.dataSync().slice();
        tf.dispose([input, codes]);
        return values;
      });
      checks.push(
        close(
          `${label} ${path === "auto" ? "host" : "tensor"} path`,
          got,
          expected,
          sinkhornTolerance(c.epsilon),
        ),
      );
    }
  }
  return checks;
};

// --- Batch norm ------------------------------------------------------------------------

/** Forward 1e-5 and gradients 1e-4, as test/batch_norm_test.ts (float32 sums, here over few values). */
const FORWARD_TOLERANCE = 1e-5;
const GRADIENT_TOLERANCE = 1e-4;

/** This rank's shard: its rows of the first axis. */
const shardOf = (c: BatchNormCase, world: Communicator) => {
  const splits = c.splits[String(world.size)]!;
  const rowSize = c.x.length / c.shape[0]!;
  const first = splits.slice(0, world.rank).reduce((a, v) => a + v, 0);
  const rows = splits[world.rank]!;
  const slice = (v: ArrayLike<number>) => Array.from(v).slice(first * rowSize, (first + rows) * rowSize);
  return { shape: [rows, ...c.shape.slice(1)], slice };
};

/** One rank's batch norm forward, running statistics and gradients of Σ y·dy. */
const runBatchNorm = (c: BatchNormCase, shape: number[], x: number[], dy: number[]) =>
  tf.tidy(() => {
    const xt = tf.tensor(x, shape);
    const dyt = tf.tensor(dy, shape);
    const gamma = tf.tensor1d(c.gamma);
    const beta = tf.tensor1d(c.beta);
    const { y, mean, variance, count } = batchNormTrain(xt, gamma, beta, c.epsilon, { relu: c.relu });
    const [dx, dgamma, dbeta] = tf.grads((xi, gi, bi) =>
      tf.sum(
        tf.mul(batchNormTrain(xi!, gi as tf.Tensor1D, bi as tf.Tensor1D, c.epsilon, { relu: c.relu }).y, dyt),
      )
    )([xt, gamma, beta]);
    const running = {
      "bn.weight": gamma,
      "bn.bias": beta,
      "bn.running_mean": tf.variable(tf.zeros([c.gamma.length])),
      "bn.running_var": tf.variable(tf.ones([c.gamma.length])),
    } as Record<string, tf.Tensor>;
    batchNorm((name) => running[name]!, "bn", xt, { training: true }, c.relu);
    const read = (t: tf.Tensor) => Array.from(t.dataSync());
    const out = {
      y: read(y),
      mean: read(mean),
      variance: read(variance),
      count,
      runningMean: read(running["bn.running_mean"]!),
      runningVar: read(running["bn.running_var"]!),
      dx: read(dx!),
      dgamma: read(dgamma!),
      dbeta: read(dbeta!),
    };
    tf.dispose([running["bn.running_mean"]!, running["bn.running_var"]!]);
    return out;
  });

const freshBatchNormCase = (world: Communicator): BatchNormCase => {
  const random = seededRandom(testSeed() + 1);
  const shape = [3 * world.size, 3, 2, 6];
  const size = shape.reduce((a, v) => a * v, 1);
  const c = 6;
  const draw = (n: number, scale: number, offset: (i: number) => number) =>
    Array.from({ length: n }, (_, i) => offset(i) + scale * (2 * random() - 1));
  const x = draw(size, 2, (i) => ((i % c) - c / 2) * 0.7);
  const gamma = draw(c, 0.5, () => 1);
  const beta = draw(c, 1, () => 0);
  const dy = draw(size, 1, () => 0);
  const g = batchNorm64(x, dy, gamma, beta, 1e-5, true);
  const splits = { [String(world.size)]: Array<number>(world.size).fill(3) };
  const rows = size / shape[0]!;
  const local = Array.from({ length: world.size }, (_, r) => {
    const part = (v: number[]) => v.slice(r * 3 * rows, (r + 1) * 3 * rows);
    const l = batchNorm64(part(x), part(dy), gamma, beta, 1e-5, true);
    return { ...l, runningMean: [], runningVar: [] } as unknown as BatchNormValues;
  });
  return {
    shape,
    relu: true,
    epsilon: 1e-5,
    momentum: 0.1,
    splits,
    x,
    gamma,
    beta,
    dy,
    global: { ...g, runningMean: [], runningVar: [] } as unknown as BatchNormValues,
    local: { [String(world.size)]: local },
  };
};

const batchNormChecks = async (world: Communicator): Promise<Check[]> => {
  const checks: Check[] = [];
  const cases = [...fixture.batchNorm, freshBatchNormCase(world)];
  const native = loadDnnl() !== undefined;
  for (const path of native ? ["oneDNN", "tensor ops"] : ["tensor ops"]) {
    for (const sync of [true, false]) {
      await withKernelSettings({ nativeBatchNorm: path === "oneDNN", syncBatchNorm: sync }, async () => {
        checks.push({
          label: `${path}: the path asked for runs`,
          error: nativeBatchNormActive() === (path === "oneDNN") ? 0 : 1,
          tolerance: 1,
        });
        for (const [i, c] of cases.entries()) {
          const label =
            `batch norm ${path} ${sync ? "sync" : "no sync"} [${c.shape}]${c.relu ? " relu" : ""}` +
            `${i === cases.length - 1 ? " fresh" : ""}`;
          const { shape, slice } = shardOf(c, world);
          const got = await assertNoTensorLeak(label, () => runBatchNorm(c, shape, slice(c.x), slice(c.dy)));
          const ref = sync ? c.global : c.local[String(world.size)]![world.rank]!;
          const part = (v: ArrayLike<number>) => (sync ? slice(v) : Array.from(v));
          checks.push(close(`${label} y`, got.y, part(ref.y), FORWARD_TOLERANCE));
          checks.push(close(`${label} mean`, got.mean, ref.mean, FORWARD_TOLERANCE));
          checks.push(close(`${label} variance`, got.variance, ref.variance, FORWARD_TOLERANCE));
          checks.push({
            label: `${label} count`,
            error: got.count === (sync ? c.x.length : shape.reduce((a, v) => a * v, 1)) / c.gamma.length
              ? 0
              : 1,
            tolerance: 1,
          });
          if (ref.runningMean.length > 0) {
            checks.push(close(`${label} running mean`, got.runningMean, ref.runningMean, FORWARD_TOLERANCE));
            checks.push(close(`${label} running var`, got.runningVar, ref.runningVar, FORWARD_TOLERANCE));
          }
          checks.push(close(`${label} dx`, got.dx, part(ref.dx), GRADIENT_TOLERANCE));
          if (sync) {
            // dgamma and dbeta are this rank's sums (SyncBatchNorm's): summed over the ranks, the global ones,
            // and each one Σ over this shard of dy·x̂ and dy with the global statistics.
            const own = batchNorm64(c.x, c.dy, c.gamma, c.beta, c.epsilon, c.relu);
            const xhat = slice(own.xhat);
            const g = slice(own.g);
            const channels = c.gamma.length;
            const dgamma = new Float64Array(channels);
            const dbeta = new Float64Array(channels);
            g.forEach((d, j) => {
              dgamma[j % channels]! += d * xhat[j]!;
              dbeta[j % channels]! += d;
            });
            checks.push(close(`${label} this rank's dgamma`, got.dgamma, dgamma, GRADIENT_TOLERANCE));
            checks.push(close(`${label} this rank's dbeta`, got.dbeta, dbeta, GRADIENT_TOLERANCE));
            const summed = Float64Array.from([...got.dgamma, ...got.dbeta]);
            world.allReduce(summed, "sum");
            checks.push(
              close(
                `${label} Σ ranks dgamma, dbeta`,
                summed,
                [...ref.dgamma, ...ref.dbeta],
                GRADIENT_TOLERANCE,
              ),
            );
          } else {
            checks.push(close(`${label} dgamma`, got.dgamma, ref.dgamma, GRADIENT_TOLERANCE));
            checks.push(close(`${label} dbeta`, got.dbeta, ref.dbeta, GRADIENT_TOLERANCE));
            // Without synchronisation each shard is normalised alone: far from the global batch norm.
            checks.push(
              differs(`${label} y vs the global batch's`, relativeError(got.y, slice(c.global.y)), 1e-2),
            );
          }
        }
      });
    }
  }
  return checks;
};

await runRank(async (world) => {
  await initBackend("wasm");
  return [...await sinkhornChecks(world), ...await batchNormChecks(world)];
});
