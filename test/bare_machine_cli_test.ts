/**
 * A machine without the optional Debian packages, as a new user has it: the
 * four variables that name library files point at files that do not exist, so
 * OpenBLAS, oneDNN, libjpeg-turbo and MPICH are absent whatever this machine
 * has. `demo`, `pretrain`, `eval` (on JPEG files, through the TypeScript
 * decoder) and `doctor` still work, and what is missing is said in one line.
 */
import assert from "node:assert/strict";
import { cliPath, runCli } from "./_helpers.ts";

const bare = {
  SWAV_BLAS_LIB: "/nonexistent/libopenblas.so.0",
  SWAV_DNNL_LIB: "/nonexistent/libdnnl.so.2",
  SWAV_TURBOJPEG_LIB: "/nonexistent/libturbojpeg.so.0",
  SWAV_MPI_LIB: "/nonexistent/libmpich.so.12",
};
const root = new URL("..", import.meta.url).pathname;
const images = new URL("./fixtures/images/", import.meta.url).pathname;

const hasLine = (file: string): boolean => {
  try {
    return Deno.readTextFileSync(file).includes("\n");
  } catch {
    return false;
  }
};

/** stderr's lines that mention a Debian package: exactly one, the start-of-run hint. */
const packageLines = (stderr: string) => stderr.split("\n").filter((line) => /apt-get install/.test(line));

Deno.test("without the optional libraries: demo, pretrain, eval and doctor work; the missing ones in one line", async (t) => {
  const folder = await Deno.makeTempDir({ prefix: "swav-bare-" });
  try {
    await t.step(
      "demo: starts, trains (its first step logged), one hint line naming the kernels' packages",
      async () => {
        // A whole demo epoch takes minutes on the wasm kernels alone: its first logged step shows it runs,
        // then Ctrl-C stops it (pretrain below runs to its end).
        const out = `${folder}/demo`;
        const child = new Deno.Command(Deno.execPath(), {
          args: ["run", "--allow-all", cliPath, "demo", "--epochs", "1", "--out", out],
          env: { NO_COLOR: "1", SWAV_BACKEND: "wasm", SWAV_THREADS: "2", ...bare },
          stdout: "null",
          stderr: "piped",
        }).spawn();
        const stderr = new Response(child.stderr).text();
        const deadline = Date.now() + 240_000;
        try {
          while (!hasLine(`${out}/metrics.jsonl`)) {
            assert.ok(Date.now() < deadline, "the demo logged no step within 4 minutes");
            await new Promise((r) => setTimeout(r, 200));
          }
        } finally {
          child.kill("SIGINT");
        }
        await child.status;
        const text = await stderr;
        const lines = packageLines(text);
        assert.equal(lines.length, 1, text);
        assert.match(lines[0]!, /^hint: `apt-get install libopenblas0-pthread libdnnl2` for /);
        assert.match(text, /demo: 1 epoch of SwAV on builtin:demo .* on wasm\b/);
        assert.doesNotMatch(text, /^error/m);
      },
    );

    await t.step("pretrain (2 steps): a checkpoint, one hint line", async () => {
      const run = await runCli(
        ["pretrain", "--data", "builtin:demo", "--out", `${folder}/run`, "--max-steps", "2", "--json"],
        bare,
      );
      assert.equal(run.code, 0, run.stderr);
      assert.equal(packageLines(run.stderr).length, 1, run.stderr);
      assert.equal(JSON.parse(run.stdout.trim().split("\n").at(-1)!).steps, 2, run.stdout);
    });

    await t.step("eval --method knn on JPEG files (no libjpeg-turbo): a result, no error", async () => {
      for (
        const [label, files] of [["a", ["jpeg_baseline.jpg", "jpeg_grey.jpg"]], [
          "b",
          ["jpeg_progressive.jpg", "jpeg_baseline444.jpg"],
        ]] as const
      ) {
        await Deno.mkdir(`${folder}/jpegs/${label}`, { recursive: true });
        for (const file of files) await Deno.copyFile(`${images}${file}`, `${folder}/jpegs/${label}/${file}`);
      }
      const result = await runCli([
        "eval",
        "--checkpoint",
        `${folder}/run`,
        "--train",
        `${folder}/jpegs`,
        "--test",
        `${folder}/jpegs`,
        "--method",
        "knn",
        "--k",
        "2",
        "--json",
      ], bare);
      assert.equal(result.code, 0, result.stderr);
      const scores = JSON.parse(result.stdout.trim().split("\n").at(-1)!);
      assert.equal(scores.method, "knn");
      assert.ok(scores.top1 >= 0 && scores.top1 <= 1, result.stdout);
      assert.doesNotMatch(result.stderr, /error/i);
    });

    await t.step("doctor: every library absent, each with its apt-get command", async () => {
      const output = await new Deno.Command(Deno.execPath(), {
        args: ["task", "--quiet", "doctor"],
        cwd: root,
        env: { NO_COLOR: "1", ...bare },
        stdout: "piped",
        stderr: "piped",
      }).output();
      const text = new TextDecoder().decode(output.stdout);
      assert.equal(output.code, 0, new TextDecoder().decode(output.stderr));
      for (const name of ["OpenBLAS", "oneDNN", "libjpeg-turbo"]) {
        assert.match(text, new RegExp(`${name}\\s+absent`));
      }
      assert.match(text, /apt-get install libopenblas0-pthread libdnnl2/);
      assert.match(text, /apt-get install libturbojpeg0/);
      assert.match(text, /apt-get install libmpich12/);
    });
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
});
