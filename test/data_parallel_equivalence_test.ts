/**
 * Data parallel equals one process: `pretrain --procs N` with each rank taking
 * B/N samples (synchronised batch norm, distributed Sinkhorn) trains as one
 * process with batch B on the same global batches: the same loss and code
 * statistics at every step and the same weights, queue and optimiser slots in
 * the last checkpoint, across an epoch boundary and with the queue in use
 * (created at epoch 2, full after its first step). Without synchronised batch
 * norm the ranks normalise their own B/N samples: another model.
 *
 * Tolerance: float32 summed in another order. Its size is measured, not
 * guessed: the same single-process run on another kernel set (`SWAV_DNNL=0`:
 * OpenBLAS and wasm instead of oneDNN, so every convolution and batch-norm sum
 * runs in another order) is the floor. On this tiny model (width 4) the
 * early batch-norm bias gradients are sums that mostly cancel, so that floor is
 * already ~1e-3 relative after one step and LARC-SGD carries it on; the ranks
 * (partial sums all-reduced, gradients averaged as a sum then a division) must
 * stay within FLOOR_FACTOR times the floor, per step and per checkpoint array,
 * and at step 1 (same weights, only the forward's order differs) within 1e-5.
 * Unsynchronised batch norm must be further from one process than the floor
 * allows the ranks to be.
 */
import assert from "node:assert/strict";
import { optionalTest } from "./_optional.ts";
import { Effect } from "effect";
import { readCheckpoint } from "../pipelines/checkpoint.ts";
import type { Checkpoint } from "../pipelines/checkpoint_format.ts";
import { runCli } from "./_helpers.ts";
import { readMetrics, writeParallelConfig, writeTinyData } from "./_tiny_run.ts";

const STEPS = 10; // epoch 1: 7 steps; epoch 2: the queue fills at step 8 and is used from step 9
const FLOOR_FACTOR = 10;

const train = async (config: string, out: string, procs: number, extra: string[] = [], env = {}) => {
  const result = await runCli([
    "pretrain",
    "--config",
    config,
    "--out",
    out,
    "--max-steps",
    String(STEPS),
    "--json",
    ...(procs > 1 ? ["--procs", String(procs)] : []),
    ...extra,
  ], { SWAV_DEBUG_PARAMS: "1", SWAV_THREADS: "1", ...env });
  assert.equal(result.code, 0, result.stderr);
  const summary = JSON.parse(result.stdout.trim().split("\n").at(-1)!);
  const checkpoint = await Effect.runPromise(readCheckpoint(summary.checkpoint));
  return { metrics: await readMetrics(out), checkpoint };
};
type Run = Awaited<ReturnType<typeof train>>;

const relative = (a: number, b: number) => Math.abs(a - b) / Math.max(Math.abs(b), 1e-12);

/** The largest relative gap of loss and code entropy over the steps, and at step 1. */
const metricGaps = (run: Run, one: Run) => {
  assert.equal(run.metrics.length, one.metrics.length);
  const gaps = run.metrics.map((m, i) => {
    const ref = one.metrics[i]!;
    assert.equal(m.step, ref.step);
    return Math.max(relative(m.loss, ref.loss), relative(m.code_entropy, ref.code_entropy));
  });
  return { first: gaps[0]!, worst: Math.max(...gaps) };
};

/** Per checkpoint array: the largest difference over the array's largest magnitude. */
const arrayGaps = (checkpoint: Checkpoint, one: Checkpoint): Map<string, number> => {
  assert.equal(checkpoint.arrays.length, one.arrays.length);
  const gaps = new Map<string, number>();
  for (const array of one.arrays) {
    const other = checkpoint.arrays.find((a) => a.name === array.name);
    assert.ok(other !== undefined, array.name);
    assert.deepEqual(other.shape, array.shape, array.name);
    const [a, b] = [array.values as Float32Array, other.values as Float32Array];
    let scale = 1e-6;
    let worst = 0;
    for (let i = 0; i < a.length; i++) {
      scale = Math.max(scale, Math.abs(a[i]!));
      worst = Math.max(worst, Math.abs(a[i]! - b[i]!));
    }
    gaps.set(array.name, worst / scale);
  }
  return gaps;
};

optionalTest(
  "2 and 4 ranks with B/N samples each train as one process with batch B (sync BN); without, differ",
  ["mpich"],
  async () => {
    const data = await writeTinyData();
    const dir = await Deno.makeTempDir({ prefix: "swav-mpi-eq-" });
    try {
      const config = await writeParallelConfig(data, dir);
      const one = await train(config, `${dir}/one`, 1);
      assert.equal(one.metrics.length, STEPS);
      assert.ok(one.checkpoint.arrays.some((a) => a.name === "queue/0"), "the queue is in the checkpoint");
      const floorRun = await train(config, `${dir}/floor`, 1, [], { SWAV_DNNL: "0" });
      const floor = metricGaps(floorRun, one);
      const floorArrays = arrayGaps(floorRun.checkpoint, one.checkpoint);
      const floorArray = (name: string) => Math.max(floorArrays.get(name)!, 1e-6);
      for (const procs of [2, 4]) {
        const many = await train(config, `${dir}/procs${procs}`, procs);
        const gaps = metricGaps(many, one);
        assert.ok(gaps.first < 1e-5, `${procs} ranks, step 1: relative gap ${gaps.first}`);
        assert.ok(
          gaps.worst <= FLOOR_FACTOR * Math.max(floor.worst, 1e-6),
          `${procs} ranks: loss/entropy gap ${gaps.worst} vs kernel-order floor ${floor.worst}`,
        );
        for (const [name, gap] of arrayGaps(many.checkpoint, one.checkpoint)) {
          assert.ok(
            gap <= FLOOR_FACTOR * floorArray(name),
            `${procs} ranks: ${name} differs by ${gap} of its scale (floor ${floorArray(name)})`,
          );
        }
      }
      // Without synchronised batch norm each rank normalises its own 8 samples: another model.
      const unsynced = await train(config, `${dir}/nosync`, 2, ["--sync-bn", "false"]);
      const gap = metricGaps(unsynced, one);
      assert.ok(
        gap.first > FLOOR_FACTOR * Math.max(floor.first, 1e-6) && gap.first > 1e-3,
        `without sync BN the step-1 loss differs (relative gap ${gap.first}, floor ${floor.first})`,
      );
    } finally {
      await Deno.remove(dir, { recursive: true });
      await Deno.remove(data, { recursive: true });
    }
  },
);
