/**
 * The run's closing line: what was ignored and why. Every test that needs an
 * optional piece asks test/_optional.ts, which appends each ignore to one file
 * per `deno test` process (test files run in separate isolates of that one
 * process, so module state is not shared, the file is). This file sorts last in
 * test/, so its line comes after every other file's tests; run alone, it reports
 * the ignores of nothing else. It never fails.
 */
import { requireOptional, tallyFile } from "./_optional.ts";

const alive = (pid: number): boolean => {
  try {
    Deno.statSync(`/proc/${pid}`);
    return true;
  } catch {
    return false;
  }
};

Deno.test("ignored tests, by missing piece", () => {
  let lines: string[] = [];
  try {
    lines = Deno.readTextFileSync(tallyFile()).split("\n").filter((line) => line !== "");
    Deno.removeSync(tallyFile());
  } catch {
    // nothing was ignored
  }
  // Tallies left by runs that ended before this file (a single test file run, an interrupted run).
  const folder = tallyFile().slice(0, tallyFile().lastIndexOf("/"));
  for (const entry of Deno.readDirSync(folder)) {
    const pid = /^swav-test-ignored-(\d+)\.jsonl$/.exec(entry.name)?.[1];
    if (pid !== undefined && Number(pid) !== Deno.pid && !alive(Number(pid))) {
      try {
        Deno.removeSync(`${folder}/${entry.name}`);
      } catch {
        // another user's, or gone meanwhile
      }
    }
  }
  const tally = new Map<string, number>();
  const kinds = { test: 0, step: 0 };
  for (const line of lines) {
    const { kind, missing } = JSON.parse(line) as { kind: "test" | "step"; missing: string[] };
    kinds[kind]++;
    for (const label of missing) tally.set(label, (tally.get(label) ?? 0) + 1);
  }
  const parts = [...tally].sort((a, b) => b[1] - a[1] || a[0].localeCompare(b[0]))
    .map(([label, count]) => `${label}: ${count}`);
  const mode = requireOptional() ? "; SWAV_REQUIRE_OPTIONAL=1: missing packages fail instead" : "";
  // Deno's own summary counts ignored tests, and ignored steps in brackets: the same split here.
  const counted = `${kinds.test} ${kinds.test === 1 ? "test" : "tests"}, ${kinds.step} ${
    kinds.step === 1 ? "step" : "steps"
  }`;
  console.log(`ignored: ${counted}${parts.length > 0 ? ` (${parts.join(", ")})` : ""}${mode}`);
});
