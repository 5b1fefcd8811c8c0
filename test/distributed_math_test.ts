/**
 * Distributed Sinkhorn and synchronised batch norm under `mpiexec` with 2 and
 * 4 ranks on this machine (oversubscribed is fine): every rank runs
 * test/mpi/distributed_math_rank.ts on its shard of one global batch and
 * reports its checks against float64 values of the whole batch (fixtures of
 * reference/distributed_reference.py and fresh random inputs; tolerances are
 * stated in the rank script). Ignored, with the reason, where MPICH (`mpiexec` and
 * libmpich) is missing (test/_optional.ts; .ci/run installs it).
 */
import assert from "node:assert/strict";
import { optionalTest } from "./_optional.ts";

const rankScript = new URL("./mpi/distributed_math_rank.ts", import.meta.url).pathname;

interface RankReport {
  readonly rank: number;
  readonly size: number;
  readonly checks: readonly { label: string; error: number; tolerance: number }[];
}

const seed = Number(Deno.env.get("SWAV_TEST_SEED") ?? Math.floor(Math.random() * 2 ** 31));

/**
 * Runs the rank script on `size` ranks, each with one native thread, with the
 * real Deno binary (Deno.execPath(): npm's wrapper script cannot start under
 * mpiexec); the ranks' reports.
 */
const runRanks = async (size: number): Promise<RankReport[]> => {
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
  const stdout = new TextDecoder().decode(output.stdout);
  const stderr = new TextDecoder().decode(output.stderr);
  const reports = stdout.split("\n").filter((line) => line.startsWith("{")).map((line) =>
    JSON.parse(line) as RankReport
  );
  assert.equal(
    reports.length,
    size,
    `${size} ranks: ${reports.length} reports (exit ${output.code})\n${stderr}`,
  );
  return reports.sort((a, b) => a.rank - b.rank);
};

for (const size of [2, 4]) {
  optionalTest(
    `distributed Sinkhorn and synchronised batch norm on ${size} ranks match float64 on the whole batch`,
    ["mpich"],
    async () => {
      console.log(`SWAV_TEST_SEED=${seed}`);
      const reports = await runRanks(size);
      for (const report of reports) {
        assert.equal(report.size, size);
        assert.ok(report.checks.length > 100, `rank ${report.rank}: only ${report.checks.length} checks`);
        const failed = report.checks.filter((c) => !(c.error < c.tolerance));
        assert.deepEqual(
          failed.map((c) => `${c.label}: ${c.error} ≥ ${c.tolerance}`),
          [],
          `rank ${report.rank} of ${size}`,
        );
      }
    },
  );
}
