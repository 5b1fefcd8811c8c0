/**
 * Data parallel equals one process: `pretrain --procs N` with each rank taking
 * B/N samples (synchronised batch norm, distributed Sinkhorn) trains as one
 * process with batch B on the same global batches: the same loss and code
 * statistics at every step and the same weights, queue and optimiser slots in
 * the last checkpoint, across an epoch boundary and with the queue in use
 * (created at epoch 2, full after its first step). Without synchronised batch
 * norm the ranks normalise their own B/N samples: the losses then differ by
 * far more than the tolerance.
 *
 * Tolerance: float32 with another summation order (per-rank partial sums
 * all-reduced, gradients averaged as a sum then a division) differs from one
 * process by ~1e-7 relative per operation; LARC-SGD and the Sinkhorn
 * iterations amplify it over the steps. Losses and code entropies must agree
 * within 1e-4 relative, every checkpoint array within 1e-3 of its largest value
 * (2e-3 at 4 ranks, one more level of partial sums).
 */
import assert from "node:assert/strict";
import { Effect } from "effect";
import { readCheckpoint } from "../pipelines/checkpoint.ts";
import { runCli } from "./_helpers.ts";
import { noMpi, readMetrics, writeParallelConfig, writeTinyData } from "./_tiny_run.ts";

const STEPS = 10; // epoch 1: 7 steps; epoch 2: the queue fills at step 8 and is used from step 9

const train = async (config: string, out: string, procs: number, extra: string[] = []) => {
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
  ], { SWAV_DEBUG_PARAMS: "1", SWAV_THREADS: "1" });
  assert.equal(result.code, 0, result.stderr);
  const summary = JSON.parse(result.stdout.trim().split("\n").at(-1)!);
  const checkpoint = await Effect.runPromise(readCheckpoint(summary.checkpoint));
  return { metrics: await readMetrics(out), checkpoint };
};

const relative = (a: number, b: number) => Math.abs(a - b) / Math.max(Math.abs(b), 1e-12);

Deno.test({
  name: "2 and 4 ranks with B/N samples each train as one process with batch B (sync BN); without, differ",
  // Needs synchronised batch norm and distributed Sinkhorn (branch mpi-math): on once they are merged.
  ignore: noMpi || Deno.env.get("SWAV_TEST_DISTRIBUTED_MATH") !== "1",
  fn: async () => {
    const data = await writeTinyData();
    const dir = await Deno.makeTempDir({ prefix: "swav-mpi-eq-" });
    try {
      const config = await writeParallelConfig(data, dir);
      const one = await train(config, `${dir}/one`, 1);
      assert.equal(one.metrics.length, STEPS);
      assert.ok(one.checkpoint.arrays.some((a) => a.name === "queue/0"), "the queue is in the checkpoint");
      for (const [procs, arrayTolerance] of [[2, 1e-3], [4, 2e-3]] as const) {
        const many = await train(config, `${dir}/procs${procs}`, procs);
        many.metrics.forEach((m, i) => {
          const ref = one.metrics[i]!;
          assert.equal(m.step, ref.step);
          assert.ok(
            relative(m.loss, ref.loss) < 1e-4,
            `${procs} ranks, step ${m.step}: loss ${m.loss} vs ${ref.loss}`,
          );
          assert.ok(
            relative(m.code_entropy, ref.code_entropy) < 1e-4,
            `${procs} ranks, step ${m.step}: code entropy ${m.code_entropy} vs ${ref.code_entropy}`,
          );
          assert.equal(m.prototypes_in_use, ref.prototypes_in_use, `${procs} ranks, step ${m.step}`);
        });
        assert.equal(many.checkpoint.arrays.length, one.checkpoint.arrays.length);
        for (const array of one.checkpoint.arrays) {
          const other = many.checkpoint.arrays.find((a) => a.name === array.name);
          assert.ok(other !== undefined, array.name);
          assert.deepEqual(other.shape, array.shape, array.name);
          const [a, b] = [array.values as Float32Array, other.values as Float32Array];
          let scale = 0;
          let worst = 0;
          for (let i = 0; i < a.length; i++) {
            scale = Math.max(scale, Math.abs(a[i]!));
            worst = Math.max(worst, Math.abs(a[i]! - b[i]!));
          }
          assert.ok(
            worst <= arrayTolerance * Math.max(scale, 1e-6),
            `${procs} ranks: ${array.name} differs by ${worst} (scale ${scale})`,
          );
        }
      }
      // Without synchronised batch norm each rank normalises its own 8 samples: another model.
      const unsynced = await train(config, `${dir}/nosync`, 2, ["--sync-bn", "false"]);
      const gap = Math.max(...unsynced.metrics.map((m, i) => relative(m.loss, one.metrics[i]!.loss)));
      assert.ok(gap > 1e-3, `without sync BN the losses differ (largest relative gap ${gap})`);
    } finally {
      await Deno.remove(dir, { recursive: true });
      await Deno.remove(data, { recursive: true });
    }
  },
});
