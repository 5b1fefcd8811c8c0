import assert from "node:assert/strict";
import { optionalStep } from "./_optional.ts";
import { Effect } from "effect";
import { benchRunConfig, parseBenchArgs } from "../bench/bench.ts";
import { writeDemoDataset } from "../data/demo_dataset.ts";
import { decodeModelConfig, estimateMemory } from "../models/model.ts";
import {
  benchmarkCrops,
  benchmarkModel,
  type EnvironmentReport,
  environmentReport,
  measuredGains,
  speedupHint,
} from "../pipelines/environment.ts";
import { plural } from "../pipelines/wording.ts";
import { WASM_HEAP_BYTES } from "../stages/encode.ts";

const root = new URL("..", import.meta.url).pathname;
const cli = new URL("../cli/main.ts", import.meta.url).pathname;

/** Files that name no library here: the variables that name library files point at them. */
const missing = {
  SWAV_BLAS_LIB: "/nonexistent/libopenblas.so.0",
  SWAV_DNNL_LIB: "/nonexistent/libdnnl.so.2",
  SWAV_TURBOJPEG_LIB: "/nonexistent/libturbojpeg.so.0",
  SWAV_MPI_LIB: "/nonexistent/libmpich.so.12",
};

const run = async (args: string[], env: Record<string, string> = {}) => {
  const output = await new Deno.Command(Deno.execPath(), {
    args,
    cwd: root,
    env: { NO_COLOR: "1", ...env },
    stdout: "piped",
    stderr: "piped",
  }).output();
  return {
    code: output.code,
    stdout: new TextDecoder().decode(output.stdout),
    stderr: new TextDecoder().decode(output.stderr),
  };
};

/** `deno task doctor --json` with the task's own permissions. */
const doctorJson = async (env: Record<string, string> = {}): Promise<EnvironmentReport> => {
  const r = await run(["task", "--quiet", "doctor", "--json"], env);
  assert.equal(r.code, 0, r.stderr);
  return JSON.parse(r.stdout.trim().split("\n").at(-1)!) as EnvironmentReport;
};

/**
 * An independent answer: does the loader open the file `variable` names here, else the soname? (The
 * whole suite also runs with the variables naming missing files, as a machine without the packages.)
 */
const loads = (variable: string, soname: string): boolean => {
  try {
    Deno.dlopen(Deno.env.get(variable) || soname, {}).close();
    return true;
  } catch {
    return false;
  }
};

const exists = (path: string): boolean => {
  try {
    Deno.statSync(path);
    return true;
  } catch {
    return false;
  }
};

Deno.test("doctor --json: what is present and absent on this machine, by the loader's own answer", async (t) => {
  const r = await doctorJson();
  assert.equal(r.native.openblas.found, loads("SWAV_BLAS_LIB", "libopenblas.so.0"));
  assert.equal(r.native.onednn.found, loads("SWAV_DNNL_LIB", "libdnnl.so.2"));
  assert.equal(r.jpeg.found, loads("SWAV_TURBOJPEG_LIB", "libturbojpeg.so.0"));
  assert.equal(r.jpeg.decoder, r.jpeg.found ? "turbojpeg" : "imagescript");
  assert.equal(r.mpi.found, loads("SWAV_MPI_LIB", "libmpich.so.12"));
  assert.equal(
    r.datasets.fashionMnist.present,
    exists("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"),
  );
  assert.equal(r.deno.version, Deno.version.deno);
  assert.equal(r.packages["@tensorflow/tfjs"], "4.22.0");
  assert.equal(r.packages["effect"], "4.1.0");
  assert.equal(r.cpu.cores, navigator.hardwareConcurrency);
  assert.equal(r.wasmHeap.limitBytes, WASM_HEAP_BYTES);
  // auto's rule: webgpu only on a real (non-fallback) adapter.
  const gpu = r.backend.webgpu;
  assert.equal(r.backend.auto, gpu !== null && gpu !== "not probed" && !gpu.fallback ? "webgpu" : "wasm");
  await optionalStep(t, "OpenBLAS's version and file", ["openblas"], () => {
    assert.match(String(r.native.openblas.version), /^\d+\.\d+/);
    assert.ok(r.native.openblas.file !== undefined && exists(r.native.openblas.file));
  });
  await optionalStep(t, "oneDNN's version and instruction set", ["onednn"], () => {
    assert.match(String(r.native.onednn.version), /^\d+\.\d+\.\d+$/);
    assert.equal(typeof r.native.onednn["isa"], "string");
    assert.equal(typeof r.native.onednn["bf16"], "boolean");
  });
  // train.precision auto follows oneDNN's own ISA answer.
  assert.equal(
    r.precision.auto,
    r.native.onednn.found && r.native.onednn["bf16"] === true && r.native.openblas.found ? "bf16" : "fp32",
  );
  // Both libraries or not: the kernels and the missing list say so.
  const both = r.native.openblas.found && r.native.onednn.found;
  assert.equal(
    r.kernels,
    both ? "wasm + oneDNN + OpenBLAS" : r.native.openblas.found ? "wasm + OpenBLAS" : "wasm",
  );
  assert.equal(r.missing.some((m) => m.piece === "native-kernels"), !both);
  // Every piece found is absent from the missing list, and every absent one is on it.
  assert.equal(r.missing.some((m) => m.piece === "libjpeg-turbo"), !r.jpeg.found);
  assert.equal(r.missing.some((m) => m.piece === "fashion-mnist"), !r.datasets.fashionMnist.present);
});

Deno.test("doctor: a library named by its variable but missing shows absent, with its apt-get command", async () => {
  const r = await doctorJson(missing);
  assert.equal(r.native.openblas.found, false);
  assert.equal(r.native.openblas.library, missing.SWAV_BLAS_LIB);
  assert.equal(r.native.onednn.found, false);
  assert.equal(r.precision.auto, "fp32", "no oneDNN: no bf16");
  assert.equal(r.jpeg.found, false);
  assert.equal(r.jpeg.decoder, "imagescript");
  assert.equal(r.mpi.found, false);
  assert.equal(r.kernels, "wasm");
  const piece = (name: string) => r.missing.find((m) => m.piece === name);
  assert.equal(piece("native-kernels")?.command, "apt-get install libopenblas0-pthread libdnnl2");
  assert.match(piece("native-kernels")!.buys, /3\.3x/);
  assert.equal(piece("libjpeg-turbo")?.command, "apt-get install libturbojpeg0");
  assert.match(piece("libjpeg-turbo")!.buys, /7x/);
  assert.match(piece("mpi")!.command, /libmpich12/);

  // oneDNN made missing: OpenBLAS runs where it is here, and the command names oneDNN's package, with
  // OpenBLAS's only where OpenBLAS is absent too.
  const dnnlOnly = await doctorJson({ SWAV_DNNL_LIB: missing.SWAV_DNNL_LIB });
  const blasHere = loads("SWAV_BLAS_LIB", "libopenblas.so.0");
  assert.equal(dnnlOnly.native.openblas.found, blasHere);
  assert.equal(
    dnnlOnly.missing.find((m) => m.piece === "native-kernels")?.command,
    `apt-get install ${blasHere ? "" : "libopenblas0-pthread "}libdnnl2`,
  );

  // The screen says the same.
  const text = await run(["task", "--quiet", "doctor"], missing);
  assert.equal(text.code, 0);
  assert.match(text.stdout, /OpenBLAS\s+absent \(\/nonexistent\/libopenblas\.so\.0/);
  assert.match(text.stdout, /oneDNN\s+absent/);
  assert.match(text.stdout, /libjpeg-turbo\s+absent/);
  assert.match(text.stdout, /apt-get install libopenblas0-pthread libdnnl2/);
  assert.match(text.stdout, /apt-get install libturbojpeg0/);
});

Deno.test("deno task doctor exits 0, also when it cannot read what it would like to", async () => {
  const r = await run(["task", "--quiet", "doctor"]);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout, /swav-ts doctor/);
  assert.match(r.stdout, /wasm heap\s+4\.0 GiB; largest benchmark batch \d+/);
  // No permissions at all: still a report (what it could not read is absent), still exit 0.
  const bare = await run(["run", "--no-prompt", new URL("../cli/doctor.ts", import.meta.url).pathname]);
  assert.equal(bare.code, 0, bare.stderr);
  assert.match(bare.stdout, /swav-ts doctor|doctor: could not finish/);
});

Deno.test("doctor: the benchmark configuration is bench/bench.ts's default, and its largest batch fits", async () => {
  const config = benchRunConfig(parseBenchArgs([]));
  for (const [key, value] of Object.entries(benchmarkModel)) {
    assert.equal((config.model as unknown as Record<string, unknown>)[key], value, key);
  }
  assert.deepEqual(config.multicrop.sizeCrops, benchmarkCrops.sizeCrops);
  assert.deepEqual(config.multicrop.nmbCrops, benchmarkCrops.nmbCrops);
  const report = await Effect.runPromise(environmentReport({ webgpu: false }));
  const batch = report.wasmHeap.largestBenchmarkBatch;
  const model = await Effect.runPromise(decodeModelConfig(benchmarkModel));
  assert.ok(estimateMemory(model, batch, benchmarkCrops).totalBytes <= WASM_HEAP_BYTES);
  assert.ok(estimateMemory(model, batch + 1, benchmarkCrops).totalBytes > WASM_HEAP_BYTES);
  assert.equal(batch, 519, "the README's figure for the benchmark configuration");
});

Deno.test("speedupHint: only for pieces that would speed this run up", async () => {
  const report = await Effect.runPromise(environmentReport({ webgpu: false }));
  const withMissing = (pieces: EnvironmentReport["missing"]): EnvironmentReport => ({
    ...report,
    missing: pieces,
  });
  const kernels = {
    piece: "native-kernels" as const,
    packages: ["libdnnl2"],
    command: "apt-get install libdnnl2",
    buys: "",
    speedsUpRuns: true,
  };
  const jpeg = {
    piece: "libjpeg-turbo" as const,
    packages: ["libturbojpeg0"],
    command: "apt-get install libturbojpeg0",
    buys: "",
    speedsUpRuns: true,
  };
  const mpi = { piece: "mpi" as const, packages: ["mpich"], command: "", buys: "", speedsUpRuns: false };
  assert.equal(speedupHint(withMissing([]), { backend: "wasm", jpeg: true }), undefined);
  assert.equal(speedupHint(withMissing([mpi]), { backend: "wasm", jpeg: true }), undefined);
  const line = speedupHint(withMissing([kernels, jpeg]), { backend: "wasm", jpeg: true })!;
  assert.match(line, /apt-get install libdnnl2 libturbojpeg0/);
  assert.match(line, /3\.3x/);
  assert.match(line, /7x/);
  // Native kernels matter only on wasm; JPEG only for JPEG data.
  assert.equal(speedupHint(withMissing([kernels]), { backend: "webgpu", jpeg: true }), undefined);
  assert.equal(
    speedupHint(withMissing([kernels]), { backend: "wasm", jpeg: false, nativeOff: true }),
    undefined,
  );
  assert.equal(speedupHint(withMissing([jpeg]), { backend: "wasm", jpeg: false }), undefined);
});

Deno.test("user-facing text names no issue numbers (the hint, what each piece buys, any string in the code)", async () => {
  const report = await Effect.runPromise(environmentReport({ webgpu: false }));
  const all = report.missing.map((p) => p.piece);
  const line = speedupHint({ ...report, missing: [] }, { backend: "wasm", jpeg: true }) ?? "";
  const texts = [line, ...Object.values(measuredGains), ...all];
  for (const text of texts) assert.doesNotMatch(text, /\bissue\s*#?\d/i, text);
  // Every line of code outside comments under the folders a user's run goes through.
  const offenders: string[] = [];
  for (
    const folder of ["backend", "cli", "config", "data", "models", "pipelines", "stages", "state", "bench"]
  ) {
    for (const entry of Deno.readDirSync(`${root}${folder}`)) {
      if (!entry.name.endsWith(".ts")) continue;
      Deno.readTextFileSync(`${root}${folder}/${entry.name}`).split("\n").forEach((text, i) => {
        const code = text.trim();
        if (code.startsWith("//") || code.startsWith("*") || code.startsWith("/*")) return;
        if (/\bissue\s*#?\d/i.test(code)) offenders.push(`${folder}/${entry.name}:${i + 1}: ${code}`);
      });
    }
  }
  assert.deepEqual(offenders, []);
});

Deno.test("plural: one epoch, two epochs", () => {
  assert.equal(plural(1, "epoch"), "1 epoch");
  assert.equal(plural(2, "step"), "2 steps");
  assert.equal(plural(0, "class", "classes"), "0 classes");
});

const hintLines = (stderr: string) => stderr.split("\n").filter((line) => line.startsWith("hint: "));

Deno.test("pretrain CLI: the start-of-run hint appears once exactly when a library is missing", async () => {
  const folder = await Deno.makeTempDir();
  try {
    await writeDemoDataset({
      folder: `${folder}/data`,
      perClassTrain: 2,
      perClassTest: 1,
      size: 16,
      seed: 3,
    });
    await Deno.writeTextFile(
      `${folder}/tiny.json`,
      JSON.stringify({
        data: { source: `${folder}/data:train`, workers: 1 },
        multicrop: { nmbCrops: [2], sizeCrops: [16], minScaleCrops: [0.3], maxScaleCrops: [1], blur: false },
        model: { arch: "resnet18", width: 4, stem: "cifar", hidden: 16, out: 8, prototypes: 20 },
        train: { epochs: 1, batchSize: 8 },
      }),
    );
    const pretrain = (out: string, env: Record<string, string>) =>
      run(
        [
          "run",
          "--allow-all",
          cli,
          "pretrain",
          "--config",
          `${folder}/tiny.json`,
          "--max-steps",
          "1",
          "--out",
          out,
        ],
        { SWAV_BACKEND: "wasm", ...env },
      );
    const here = await doctorJson();
    const complete = await pretrain(`${folder}/run-complete`, {});
    assert.equal(complete.code, 0, complete.stderr);
    const expected = here.missing.some((m) => m.piece === "native-kernels" || m.piece === "libjpeg-turbo");
    assert.equal(hintLines(complete.stderr).length, expected ? 1 : 0, complete.stderr);

    const lacking = await pretrain(`${folder}/run-lacking`, { SWAV_DNNL_LIB: missing.SWAV_DNNL_LIB });
    assert.equal(lacking.code, 0, lacking.stderr);
    const lines = hintLines(lacking.stderr);
    assert.equal(lines.length, 1, lacking.stderr);
    assert.match(lines[0]!, /libdnnl2/);
    assert.match(lines[0]!, /3\.3x/);
    assert.match(lacking.stdout, /done: 1 step,/);
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
});

Deno.test("bench: the hint once at start; never from a second announcement in the same process", async () => {
  const bench = await run(
    ["run", "--allow-all", "bench/bench.ts", "--stage", "decode", "--reps", "1"],
    { SWAV_DNNL_LIB: missing.SWAV_DNNL_LIB },
  );
  assert.equal(bench.code, 0, bench.stderr);
  assert.equal(hintLines(bench.stderr).length, 1, bench.stderr);
  assert.match(hintLines(bench.stderr)[0]!, /libdnnl2/);
  const noBlas = await run(
    ["run", "--allow-all", "bench/bench.ts", "--stage", "decode", "--reps", "1", "--no-blas"],
    { SWAV_DNNL_LIB: missing.SWAV_DNNL_LIB },
  );
  assert.equal(hintLines(noBlas.stderr).length, 0, noBlas.stderr);

  const twice = await run([
    "eval",
    "--allow-all",
    `import { Effect } from "effect";
     import { announceSpeedupHint } from "./pipelines/environment.ts";
     await Effect.runPromise(announceSpeedupHint({ backend: "wasm", jpeg: true }));
     await Effect.runPromise(announceSpeedupHint({ backend: "wasm", jpeg: true }));`,
  ], { SWAV_DNNL_LIB: missing.SWAV_DNNL_LIB });
  assert.equal(twice.code, 0, twice.stderr);
  assert.equal(hintLines(twice.stderr).length, 1, twice.stderr);
});
