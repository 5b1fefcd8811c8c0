/**
 * DeepCluster-v2 and SimCLR data parallel equal one process: `pretrain --procs 2` with B/2 samples a
 * rank trains as one process with batch B on the same global batches, over an epoch boundary.
 *
 * - DeepCluster-v2: the same loss and prototypes in use at every step (the first epoch's k-means runs
 *   over the initial fill pass's bank, the second's over the bank the steps wrote, with the dropped
 *   remainder's samples left without target), and in the last checkpoint the same prototypes (the
 *   second epoch's centroids: frozen), weights, presence (equal), present rows and targets (no more
 *   differing than in the floor run: k-means on this untrained model has near ties); the 2-rank
 *   checkpoint, taken mid-epoch, resumes in one process as one process's checkpoint does.
 * - SimCLR: the same loss and embedding spread at every step and the same weights after 10 steps
 *   (gradients through the gather of the embeddings).
 *
 * Tolerance: float32 summed in another order, measured as in data_parallel_equivalence_test.ts: the
 * same single-process run on another kernel set (`SWAV_DNNL=0`) is the floor; the ranks stay within
 * FLOOR_FACTOR times it, per step and per checkpoint array, and at step 1 within 1e-5 relative.
 *
 * On 2 and 4 ranks, test/mpi/methods_rank.ts checks the pieces exactly on fresh random inputs
 * (k-means centroids and targets, the merged and re-owned bank, the loss and gradients of both
 * methods). Without MPI: NT-Xent over gathered candidates, per rank, averages to the whole batch's.
 */
import assert from "node:assert/strict";
import * as tf from "@tensorflow/tfjs";
import { Effect } from "effect";
import { initBackend } from "../backend/tensor_backend.ts";
import { readCheckpoint } from "../pipelines/checkpoint.ts";
import type { Checkpoint } from "../pipelines/checkpoint_format.ts";
import { ntXent } from "../stages/nt_xent.ts";
import { optionalTest } from "./_optional.ts";
import { runCli } from "./_helpers.ts";
import { writeParallelConfig, writeTinyData } from "./_tiny_run.ts";

const STEPS = 10; // 7 steps an epoch: the second epoch's k-means runs before step 8
const FLOOR_FACTOR = 10;

interface Metric {
  readonly step: number;
  readonly loss: number;
  readonly prototypes_in_use?: number;
  readonly embedding_std?: number;
}

const train = async (config: string, out: string, procs: number, env = {}, steps = STEPS, resume = false) => {
  const result = await runCli([
    "pretrain",
    "--config",
    config,
    "--out",
    out,
    "--max-steps",
    String(steps),
    "--json",
    ...(procs > 1 ? ["--procs", String(procs)] : []),
    ...(resume ? ["--resume"] : []),
  ], { SWAV_DEBUG_PARAMS: "1", SWAV_THREADS: "1", ...env });
  assert.equal(result.code, 0, result.stderr);
  const summary = JSON.parse(result.stdout.trim().split("\n").at(-1)!);
  const checkpoint = await Effect.runPromise(readCheckpoint(summary.checkpoint));
  const metrics = (await Deno.readTextFile(`${out}/metrics.jsonl`)).trim().split("\n")
    .map((line) => JSON.parse(line) as Metric);
  return { metrics, checkpoint };
};
type Run = Awaited<ReturnType<typeof train>>;

const relative = (a: number, b: number) => Math.abs(a - b) / Math.max(Math.abs(b), 1e-12);

const metricGaps = (run: Run, one: Run) => {
  assert.equal(run.metrics.length, one.metrics.length);
  const gaps = run.metrics.map((m, i) => {
    const ref = one.metrics[i]!;
    assert.equal(m.step, ref.step);
    const std = m.embedding_std === undefined ? 0 : relative(m.embedding_std, ref.embedding_std!);
    return Math.max(relative(m.loss, ref.loss), std);
  });
  return { first: gaps[0]!, worst: Math.max(...gaps) };
};

const arrayOf = (checkpoint: Checkpoint, name: string) => {
  const array = checkpoint.arrays.find((a) => a.name === name);
  assert.ok(array !== undefined, name);
  return array;
};

/** Per float array: the largest difference over its largest magnitude (bank rows: present rows only). */
const arrayGaps = (checkpoint: Checkpoint, one: Checkpoint): Map<string, number> => {
  assert.equal(checkpoint.arrays.length, one.arrays.length);
  const present = one.arrays.find((a) => a.name === "bank/present")?.values;
  const gaps = new Map<string, number>();
  for (const array of one.arrays) {
    if (!(array.values instanceof Float32Array)) continue;
    const other = arrayOf(checkpoint, array.name);
    assert.deepEqual(other.shape, array.shape, array.name);
    const [a, b] = [array.values, other.values as Float32Array];
    const counts = (i: number) =>
      !array.name.startsWith("bank/") || present![Math.floor(i / array.shape[1]!)] === 1;
    let scale = 1e-6;
    let worst = 0;
    for (let i = 0; i < a.length; i++) {
      if (!counts(i)) continue;
      scale = Math.max(scale, Math.abs(a[i]!));
      worst = Math.max(worst, Math.abs(a[i]! - b[i]!));
    }
    gaps.set(array.name, worst / scale);
  }
  return gaps;
};

const equivalence = (method: "deepclusterv2" | "simclr") => async () => {
  const data = await writeTinyData();
  const dir = await Deno.makeTempDir({ prefix: `swav-mpi-${method}-` });
  try {
    const config = await writeParallelConfig(data, dir, { method });
    const one = await train(config, `${dir}/one`, 1);
    assert.equal(one.metrics.length, STEPS);
    const floorRun = await train(config, `${dir}/floor`, 1, { SWAV_DNNL: "0" });
    const floor = metricGaps(floorRun, one);
    const floorArrays = arrayGaps(floorRun.checkpoint, one.checkpoint);
    const many = await train(config, `${dir}/procs2`, 2);
    const gaps = metricGaps(many, one);
    assert.ok(gaps.first < 1e-5, `2 ranks, step 1: relative gap ${gaps.first}`);
    assert.ok(
      gaps.worst <= FLOOR_FACTOR * Math.max(floor.worst, 1e-6),
      `2 ranks: loss gap ${gaps.worst} vs kernel-order floor ${floor.worst}`,
    );
    for (const [name, gap] of arrayGaps(many.checkpoint, one.checkpoint)) {
      const allowed = FLOOR_FACTOR * Math.max(floorArrays.get(name)!, 1e-6);
      assert.ok(gap <= allowed, `2 ranks: ${name} differs by ${gap} of its scale (allowed ${allowed})`);
    }
    if (method === "deepclusterv2") {
      assert.deepEqual(
        many.metrics.map((m) => m.prototypes_in_use),
        one.metrics.map((m) => m.prototypes_in_use),
      );
      const present = arrayOf(one.checkpoint, "bank/present").values as Int32Array;
      assert.ok(
        present.some((p) => p === 1) && present.some((p) => p === 0),
        "some samples present, some not",
      );
      assert.deepEqual(
        Array.from(arrayOf(many.checkpoint, "bank/present").values),
        Array.from(present),
        "bank presence",
      );
      // End to end the embeddings differ by float order, and k-means on this untrained model has
      // near ties: no more targets may differ than in the kernel-order floor run, with FLOOR_FACTOR's
      // slack (the exact equality on fresh inputs is the rank script's).
      for (const name of one.checkpoint.arrays.map((a) => a.name).filter((n) => n.startsWith("targets/"))) {
        const a = arrayOf(one.checkpoint, name).values;
        const differing = (run: Run) =>
          a.filter((t, i) => t !== arrayOf(run.checkpoint, name).values[i]).length;
        assert.ok(a.some((t) => t === -100), `${name}: a sample without target`);
        assert.ok(
          differing(many) <= FLOOR_FACTOR * Math.max(1, differing(floorRun)),
          `${name}: ${differing(many)} targets differ (floor ${differing(floorRun)})`,
        );
      }
      // The 2-rank checkpoint (mid-epoch, the merged bank) resumes in one process as one process's does.
      const resumed = await train(config, `${dir}/procs2`, 1, {}, STEPS + 4, true);
      const oneResumed = await train(config, `${dir}/one`, 1, {}, STEPS + 4, true);
      const floorResumed = await train(config, `${dir}/floor`, 1, { SWAV_DNNL: "0" }, STEPS + 4, true);
      const resumedGaps = metricGaps(resumed, oneResumed);
      const resumedFloor = metricGaps(floorResumed, oneResumed);
      assert.equal(resumed.metrics.length, STEPS + 4);
      assert.ok(
        resumedGaps.worst <= FLOOR_FACTOR * Math.max(resumedFloor.worst, 1e-6),
        `resumed on 1 process: loss gap ${resumedGaps.worst} vs floor ${resumedFloor.worst}`,
      );
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
    await Deno.remove(data, { recursive: true });
  }
};

optionalTest(
  "DeepCluster-v2: 2 ranks with B/2 samples each give one process's k-means, targets and losses (B)",
  ["mpich"],
  equivalence("deepclusterv2"),
);

optionalTest(
  "SimCLR: 2 ranks with B/2 samples each give one process's losses and weights (B): gradients through the gather",
  ["mpich"],
  equivalence("simclr"),
);

const rankScript = new URL("./mpi/methods_rank.ts", import.meta.url).pathname;
const seed = Number(Deno.env.get("SWAV_TEST_SEED") ?? Math.floor(Math.random() * 2 ** 31));

for (const size of [2, 4]) {
  optionalTest(
    `DeepCluster-v2 k-means, targets, loss and SimCLR's gather on ${size} ranks equal one process's`,
    ["mpich"],
    async () => {
      console.log(`SWAV_TEST_SEED=${seed}`);
      const child = new Deno.Command("mpiexec", {
        args: ["-n", String(size), "-bind-to", "none", Deno.execPath(), "run", "--allow-all", rankScript],
        env: { NO_COLOR: "1", SWAV_THREADS: "1", SWAV_TEST_SEED: String(seed) },
        stdout: "piped",
        stderr: "piped",
      }).spawn();
      // A collective left waiting would hang the test: no run of this script takes a minute.
      const timer = setTimeout(() => child.kill("SIGKILL"), 60_000);
      const output = await child.output();
      clearTimeout(timer);
      const reports = new TextDecoder().decode(output.stdout).split("\n").filter((l) => l.startsWith("{"))
        .map((l) =>
          JSON.parse(l) as { rank: number; checks: { label: string; error: number; tolerance: number }[] }
        );
      assert.equal(reports.length, size, new TextDecoder().decode(output.stderr));
      for (const report of reports) {
        assert.ok(report.checks.length >= 20, `rank ${report.rank}: ${report.checks.length} checks`);
        const failed = report.checks.filter((c) => !(c.error < c.tolerance));
        assert.deepEqual(
          failed.map((c) => `${c.label}: ${c.error} ≥ ${c.tolerance}`),
          [],
          `rank ${report.rank}`,
        );
      }
    },
  );
}

Deno.test("NT-Xent over gathered candidates: each rank's anchors' mean averages to the whole batch's", async () => {
  await initBackend("cpu");
  for (const [crops, b, ranks] of [[2, 3, 2], [6, 2, 4]] as const) {
    const batch = b * ranks;
    // Whole batch crop-major: row c·B + r·b + i is rank r's crop c of image i.
    const all = tf.tidy(() => {
      const z = tf.randomNormal([crops * batch, 8], 0, 1, "float32", 7 + crops) as tf.Tensor2D;
      return tf.div(z, tf.norm(z, 2, 1, true)) as tf.Tensor2D;
    });
    const rowsOf = (r: number) =>
      Int32Array.from({ length: crops * b }, (_, j) => Math.floor(j / b) * batch + r * b + (j % b));
    const config = { temperature: 0.1 };
    const whole = tf.tidy(() => ntXent({ embeddings: all, batchSize: batch }, config).dataSync()[0]!);
    // Gradients with respect to the gathered matrix, summed over the ranks, equal the whole loss's times ranks.
    const wholeGrad = tf.tidy(() =>
      tf.grad((x: tf.Tensor) => ntXent({ embeddings: x as tf.Tensor2D, batchSize: batch }, config))(all)
        .dataSync()
    );
    let mean = 0;
    const summed = new Float64Array(all.size);
    for (let r = 0; r < ranks; r++) {
      const index = tf.tensor1d(rowsOf(r), "int32");
      const f = (x: tf.Tensor) => {
        const anchors = tf.gather(x, index) as tf.Tensor2D;
        return ntXent({
          embeddings: anchors,
          batchSize: b,
          gathered: { all: x as tf.Tensor2D, rank: r, ranks },
        }, config);
      };
      mean += tf.tidy(() => f(all).dataSync()[0]!) / ranks;
      tf.tidy(() => tf.grad(f)(all).dataSync()).forEach((g, i) => (summed[i]! += g / ranks));
      index.dispose();
    }
    assert.ok(Math.abs(mean - whole) < 1e-5 * Math.abs(whole), `crops ${crops}: ${mean} vs ${whole}`);
    let worst = 0;
    let scale = 0;
    wholeGrad.forEach((g, i) => {
      worst = Math.max(worst, Math.abs(g - summed[i]!));
      scale = Math.max(scale, Math.abs(g));
    });
    assert.ok(worst < 1e-5 * scale, `crops ${crops}: gradient gap ${worst} of ${scale}`);
    all.dispose();
  }
});
