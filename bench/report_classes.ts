/**
 * The report of an ImageNet-sized evaluation: `report RUN_DIR` on a run folder that holds a
 * generated `eval-knn.json` of N classes (50 test images each, seeded), timed as a whole process,
 * with its peak RSS (GNU time) and the size of the page it writes.
 *
 *   npx deno run -A bench/report_classes.ts [N ...]      (default: 50 1000 1500)
 */
import { syntheticEval } from "../test/_synthetic_eval.ts";

const counts = Deno.args.length > 0 ? Deno.args.map(Number) : [50, 1000, 1500];
const cli = new URL("../cli/run_report.ts", import.meta.url).pathname;
const root = await Deno.makeTempDir({ prefix: "swav-bench-report-" });
try {
  for (const n of counts) {
    const run = `${root}/run-${n}`;
    await Deno.mkdir(run);
    await Deno.writeTextFile(`${run}/eval-knn.json`, JSON.stringify(syntheticEval(n)));
    const evalBytes = (await Deno.stat(`${run}/eval-knn.json`)).size;
    const started = performance.now();
    const out = await new Deno.Command("/usr/bin/time", {
      args: ["-f", "peak-rss-kb %M", Deno.execPath(), "run", "-A", cli, run],
      env: { NO_COLOR: "1", SWAV_BACKEND: "wasm" },
    }).output();
    const seconds = (performance.now() - started) / 1000;
    const stderr = new TextDecoder().decode(out.stderr);
    const rss = Number(/peak-rss-kb (\d+)/.exec(stderr)?.[1] ?? NaN) / 1024;
    const size = out.code === 0 ? (await Deno.stat(`${run}/report.html`)).size : NaN;
    console.log(
      `${String(n).padStart(5)} classes: eval-knn.json ${
        (evalBytes / 1e6).toFixed(1)
      } MB, exit ${out.code}, ${seconds.toFixed(1)} s, peak RSS ${rss.toFixed(0)} MB, report ${
        (size / 1e3).toFixed(0)
      } kB`,
    );
  }
} finally {
  await Deno.remove(root, { recursive: true });
}
