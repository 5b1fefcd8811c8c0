/**
 * One rank of test/data_parallel_methods_test.ts (run under `mpiexec -n 2|4`): DeepCluster-v2's and
 * SimCLR's data-parallel pieces on this rank's shard of one global set, against the same pieces run
 * in one process on the whole set (every rank computes that too). Fresh random unit vectors (seeded
 * by SWAV_TEST_SEED, the same on every rank), so k-means has no near ties.
 *
 * - DeepCluster-v2: the bank (each sample present on the rank its shuffled shard gives it) merged for
 *   the checkpoint equals the whole bank; k-means over the shards (start rows by global id, sums and
 *   counts all-reduced) gives the whole bank's centroids (1e-6 relative) and targets (all equal),
 *   also from a checkpoint's whole bank owned again by id mod size (resume); the per-rank loss with
 *   the global divisors averages to the whole batch's loss (1e-5) and its prototype gradients too.
 * - SimCLR: embeddings of a linear map gathered with `allGatherRows`: the ranks' mean NT-Xent equals
 *   the whole batch's (1e-5) and the gradients (the step's lean backward, then averaged over the
 *   ranks) equal the whole batch's (1e-5); without the gather the loss differs; the embedding
 *   spread over the ranks equals the whole batch's.
 */
import * as tf from "@tensorflow/tfjs";
import { type Communicator, singleProcess } from "../../backend/communicator.ts";
import { leanVariableGrads } from "../../backend/lean_gradients.ts";
import { initBackend } from "../../backend/tensor_backend.ts";
import { clusterMemory, lossDivisors, startRows } from "../../pipelines/deepclusterv2.ts";
import {
  allGatherRows,
  embeddingStdOverRanks,
  mergedBank,
  ownRestoredBank,
} from "../../pipelines/data_parallel_methods.ts";
import { embeddingStd } from "../../pipelines/simclr.ts";
import { clusterLoss, NO_TARGET } from "../../stages/cluster_loss.ts";
import { ntXent } from "../../stages/nt_xent.ts";
import { makeMemoryBank, type MemoryBank, writeCrop } from "../../state/memory_bank.ts";
import { type Check, close, differs, runRank, seededRandom, testSeed } from "./_rank.ts";

const unitRows = (random: () => number, n: number, dim: number): Float32Array => {
  const out = new Float32Array(n * dim);
  for (let r = 0; r < n; r++) {
    let ss = 0;
    for (let j = 0; j < dim; j++) {
      const v = random() * 2 - 1;
      out[r * dim + j] = v;
      ss += v * v;
    }
    for (let j = 0; j < dim; j++) out[r * dim + j] = out[r * dim + j]! / Math.sqrt(ss);
  }
  return out;
};

const equalCount = (label: string, got: ArrayLike<number>, ref: ArrayLike<number>): Check => {
  let differ = 0;
  for (let i = 0; i < ref.length; i++) if (got[i] !== ref[i]) differ++;
  return { label: `${label} (${differ} of ${ref.length} differ)`, error: differ, tolerance: 0.5 };
};

const copyBank = (bank: MemoryBank): MemoryBank => ({
  ...bank,
  banks: bank.banks.map((b) => b.slice()),
  present: bank.present.slice(),
  targets: bank.targets.map((t) => t.slice()),
});

const deepClusterChecks = async (world: Communicator): Promise<Check[]> => {
  const checks: Check[] = [];
  const random = seededRandom(testSeed() * 7919 + 1);
  const [size, dim, heads] = [97, 16, [7, 5, 9]];
  const rows = [unitRows(random, size, dim), unitRows(random, size, dim)];
  // About a tenth of the samples are not in the bank (the dropped remainder); the rest are shuffled over the ranks.
  const inBank = Array.from({ length: size }, () => random() > 0.1);
  const owner = Array.from({ length: size }, () => Math.floor(random() * world.size));
  const whole = makeMemoryBank({ size, dim, crops: 2, heads: heads.length });
  const mine = makeMemoryBank({ size, dim, crops: 2, heads: heads.length });
  for (let id = 0; id < size; id++) {
    if (!inBank[id]) continue;
    for (const i of [0, 1]) {
      const row = rows[i]!.subarray(id * dim, (id + 1) * dim);
      writeCrop(whole, i, Int32Array.of(id), row);
      if (owner[id] === world.rank) writeCrop(mine, i, Int32Array.of(id), row);
    }
  }
  const merged = copyBank(mergedBank(mine, world));
  checks.push(equalCount("merged bank presence", merged.present, whole.present));
  for (const i of [0, 1]) {
    const present = (values: Float32Array) =>
      values.filter((_, k) => whole.present[Math.floor(k / dim)] === 1);
    checks.push(
      close(`merged bank ${i} present rows`, present(merged.banks[i]!), present(whole.banks[i]!), 1e-7),
    );
  }
  const start = (h: number, n: number, k: number) => startRows(n, k, testSeed(), 0, h);
  const ref = await runKmeans(whole, heads, start, singleProcess);
  const got = await runKmeans(mine, heads, start, world);
  // Resume: every rank restores the checkpoint's whole bank and keeps id mod size as its own.
  ownRestoredBank(merged, world);
  const resumed = await runKmeans(merged, heads, start, world);
  heads.forEach((_, h) => {
    checks.push(close(`k-means head ${h} centroids`, got.centroids[h]!, ref.centroids[h]!, 1e-6));
    checks.push(equalCount(`k-means head ${h} targets`, mine.targets[h]!, whole.targets[h]!));
    checks.push(close(`resumed head ${h} centroids`, resumed.centroids[h]!, ref.centroids[h]!, 1e-6));
    checks.push(equalCount(`resumed head ${h} targets`, merged.targets[h]!, whole.targets[h]!));
  });
  checks.push(equalCount("presence cleared", mine.present, new Uint8Array(size)));
  checks.push({
    label: "some samples without target",
    error: whole.targets[0]!.some((t) => t === NO_TARGET) ? 0 : 1,
    tolerance: 0.5,
  });

  // The loss of a global batch of 4·size samples, 2 crops; rank r holds samples r, r + size, ...
  const b = 4;
  const batch = b * world.size;
  const crops = 2;
  const ids = Int32Array.from({ length: batch }, () => Math.floor(random() * size));
  const embeddings = unitRows(random, crops * batch, dim);
  const prototypes = ref.centroids.map((c, h) => tf.variable(tf.tensor2d(c, [heads[h]!, dim])));
  const lossOf = (rowsOf: Int32Array, samples: Int32Array, divisors?: number[]) => {
    const z = tf.tensor2d(
      Float32Array.from(
        Array.from(rowsOf).flatMap((r) => Array.from(embeddings.subarray(r * dim, (r + 1) * dim))),
      ),
      [rowsOf.length, dim],
    );
    const targets = whole.targets.map((t) => samples.map((id) => t[id]!));
    const { value, grads } = leanVariableGrads(
      () => clusterLoss({ embeddings: z, prototypes, targets, divisors }, { temperature: 0.1 }),
      prototypes,
    );
    const out = {
      loss: value.dataSync()[0]!,
      grads: Float64Array.from(prototypes.flatMap((p) => Array.from(grads[p.name]!.dataSync()))),
    };
    tf.dispose([z, value, ...Object.values(grads)]);
    return out;
  };
  const all = Int32Array.from({ length: crops * batch }, (_, k) => k);
  const wholeLoss = lossOf(all, ids);
  const localSamples = Int32Array.from({ length: b }, (_, i) => world.rank + i * world.size);
  const localRows = Int32Array.from(
    { length: crops * b },
    (_, k) => Math.floor(k / b) * batch + localSamples[k % b]!,
  );
  const localTargets = whole.targets.map((t) => localSamples.map((s) => t[ids[s]!]!));
  const local = lossOf(localRows, localSamples.map((s) => ids[s]!), lossDivisors(localTargets, crops, world));
  const mean = Float64Array.of(local.loss);
  world.allReduce(mean, "mean");
  world.allReduce(local.grads, "mean");
  checks.push(close("cluster loss, mean over ranks", mean, [wholeLoss.loss], 1e-5));
  checks.push(close("cluster loss prototype gradients, mean over ranks", local.grads, wholeLoss.grads, 1e-5));
  tf.dispose(prototypes);
  return checks;
};

const runKmeans = async (
  bank: MemoryBank,
  heads: number[],
  start: (h: number, n: number, k: number) => Int32Array,
  comm: Communicator,
) => {
  const { Effect } = await import("effect");
  return { centroids: await Effect.runPromise(clusterMemory(bank, heads, 10, start, comm)) };
};

const simclrChecks = async (world: Communicator): Promise<Check[]> => {
  const checks: Check[] = [];
  const random = seededRandom(testSeed() * 104729 + 3);
  const [b, crops, inDim, dim] = [3, 4, 10, 8];
  const batch = b * world.size;
  const x = Float32Array.from({ length: crops * batch * inDim }, () => random() * 2 - 1);
  const w = tf.variable(
    tf.tensor2d(Float32Array.from({ length: inDim * dim }, () => random() - 0.5), [inDim, dim]),
  );
  const embed = (rows: Int32Array) =>
    tf.tidy(() => {
      const input = tf.gather(tf.tensor2d(x, [crops * batch, inDim]), tf.tensor1d(rows, "int32"));
      const z = tf.matMul(input, w);
      return tf.div(z, tf.norm(z, 2, 1, true)) as tf.Tensor2D;
    });
  const run = (rows: Int32Array, loss: (z: tf.Tensor2D) => tf.Scalar) => {
    let std = 0;
    const { value, grads } = leanVariableGrads(() => {
      const z = embed(rows);
      std = tf.tidy(() => tf.mean(tf.sqrt(tf.moments(z, 0).variance)).dataSync()[0]!);
      return loss(z);
    }, [w]);
    const out = { loss: value.dataSync()[0]!, grad: Float64Array.from(grads[w.name]!.dataSync()), std };
    tf.dispose([value, ...Object.values(grads)]);
    return out;
  };
  const config = { temperature: 0.1 };
  const all = Int32Array.from({ length: crops * batch }, (_, k) => k);
  const whole = run(all, (z) => ntXent({ embeddings: z, batchSize: batch }, config));
  const localRows = Int32Array.from(
    { length: crops * b },
    (_, k) => Math.floor(k / b) * batch + world.rank * b + (k % b),
  );
  const gathered = run(localRows, (z) =>
    ntXent(
      {
        embeddings: z,
        batchSize: b,
        gathered: { all: allGatherRows(z, crops, world), rank: world.rank, ranks: world.size },
      },
      config,
    ));
  const loss = Float64Array.of(gathered.loss);
  world.allReduce(loss, "mean");
  world.allReduce(gathered.grad, "mean");
  checks.push(close("NT-Xent through the gather, mean over ranks", loss, [whole.loss], 1e-5));
  checks.push(close("NT-Xent gradient through the gather, mean over ranks", gathered.grad, whole.grad, 1e-5));
  const alone = run(localRows, (z) => ntXent({ embeddings: z, batchSize: b }, config));
  const aloneLoss = Float64Array.of(alone.loss);
  world.allReduce(aloneLoss, "mean");
  checks.push(
    differs("NT-Xent without the gather vs the whole batch's", Math.abs(aloneLoss[0]! - whole.loss), 1e-3),
  );
  const zLocal = embed(localRows);
  const zWhole = embed(all);
  checks.push(
    close("embedding spread over the ranks", [await embeddingStdOverRanks(zLocal, world)], [
      await embeddingStd(zWhole),
    ], 1e-5),
  );
  tf.dispose([zLocal, zWhole, w]);
  return checks;
};

await runRank(async (world) => {
  await initBackend("wasm");
  return [...await deepClusterChecks(world), ...await simclrChecks(world)];
});
