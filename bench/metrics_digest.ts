/**
 * A run's numbers without its timings: `metrics.jsonl` reduced to step, loss,
 * code_entropy and prototypes_in_use per line (images_per_s varies run to
 * run), hashed; given two files, the first step where they differ. A refactor
 * proves it changed nothing by printing the same digest before and after.
 *
 *   npx deno run -A bench/metrics_digest.ts RUN/metrics.jsonl [OTHER/metrics.jsonl]
 */
const reduce = async (path: string): Promise<string[]> =>
  (await Deno.readTextFile(path)).split("\n").filter((line) => line.trim() !== "").map((line) => {
    const m = JSON.parse(line);
    return JSON.stringify([m.step, m.loss, m.code_entropy, m.prototypes_in_use]);
  });

const digest = async (lines: string[]): Promise<string> => {
  const bytes = new TextEncoder().encode(lines.join("\n"));
  const hash = new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
  return Array.from(hash, (b) => b.toString(16).padStart(2, "0")).join("");
};

if (import.meta.main) {
  const [first, second] = Deno.args;
  if (first === undefined) {
    console.error("usage: metrics_digest.ts METRICS.jsonl [OTHER.jsonl]");
    Deno.exit(2);
  }
  const a = await reduce(first);
  console.log(`${first}: ${a.length} steps, sha256 ${await digest(a)}`);
  if (second !== undefined) {
    const b = await reduce(second);
    console.log(`${second}: ${b.length} steps, sha256 ${await digest(b)}`);
    const differing = a.findIndex((line, i) => line !== b[i]);
    if (differing >= 0) {
      console.log(`first difference at line ${differing + 1}: ${a[differing]} vs ${b[differing]}`);
    } else if (a.length !== b.length) console.log("identical up to the shorter file's end");
    else console.log("identical");
    Deno.exitCode = differing >= 0 || a.length !== b.length ? 1 : 0;
  }
}
