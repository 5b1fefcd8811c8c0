/**
 * `deno task doctor [--json]`: one screen on what this machine gives swav-ts,
 * what is missing and the command that adds it (PyTorch's `collect_env`). A
 * report, never a failure: it exits 0 whatever it finds.
 */
import type { EnvironmentReport, LibraryStatus } from "../pipelines/environment.ts";
import { plural } from "../pipelines/wording.ts";

const gib = (bytes: number): string => `${(bytes / 1024 ** 3).toFixed(1)} GiB`;

/** The loader's reason without its repeated prefixes ("...: cannot open shared object file: No such file"). */
const shortReason = (error: string | undefined): string =>
  error === undefined
    ? "not found"
    : [...new Set(error.split("; ").map((part) => part.split(": ").at(-1) ?? part))].join("; ");

const library = (name: string, s: LibraryStatus, details: string[]): string => {
  if (s.disabled) return `${name.padEnd(13)} off (${s.error ?? "disabled"})`;
  if (!s.found) return `${name.padEnd(13)} absent (${s.library}: ${shortReason(s.error)})`;
  return `${name.padEnd(13)} ${[s.version, s.file ?? s.library, ...details].filter(Boolean).join(", ")}`;
};

/** The report as one screen of text. */
export const formatReport = (r: EnvironmentReport): string => {
  const lines: string[] = [];
  const pkg = (name: string) => r.packages[name] ?? "?";
  lines.push(
    "swav-ts doctor",
    `  deno          ${r.deno.version} (V8 ${r.deno.v8}, TypeScript ${r.deno.typescript}), ${r.os}`,
    `  packages      TF.js ${pkg("@tensorflow/tfjs")} (wasm ${pkg("@tensorflow/tfjs-backend-wasm")}, webgpu ${
      pkg("@tensorflow/tfjs-backend-webgpu")
    }), Effect ${pkg("effect")}`,
  );
  const gpu = r.backend.webgpu;
  const gpuText = gpu === "not probed"
    ? "not probed"
    : gpu === null
    ? "no adapter"
    : `${gpu.description}${gpu.fallback ? " (fallback)" : ""}; ${
      Object.entries(gpu.limits).map(([k, v]) =>
        `${k} ${v >= 1024 ** 2 ? `${(v / 1024 ** 2).toFixed(0)} MiB` : v}`
      )
        .join(", ")
    }`;
  lines.push(
    `  backend       auto -> ${r.backend.auto}: ${r.backend.reason}${
      r.backend.requested === "auto" ? "" : ` (SWAV_BACKEND=${r.backend.requested} overrides it)`
    }`,
    `  webgpu        ${gpuText}`,
    `  kernels       ${r.kernels}`,
  );
  const o = r.native.openblas;
  const d = r.native.onednn;
  lines.push(
    `  ${library("OpenBLAS", o, typeof o["core"] === "string" ? [`kernels ${o["core"]}`] : [])}`,
    `  ${
      library("oneDNN", d, [
        ...(typeof d["isa"] === "string" ? [`ISA ${d["isa"]}`] : []),
        ...(typeof d["bf16"] === "boolean" ? [`bf16 ${d["bf16"] ? "native" : "emulated"}`] : []),
      ])
    }`,
    `  ${library("libjpeg-turbo", r.jpeg, [`decoder ${r.jpeg.decoder}`])}`,
    `  ${
      r.mpi.found
        ? `MPI           ${[r.mpi.version, r.mpi.file ?? r.mpi.library].filter(Boolean).join(", ")}`
        : `MPI           absent (${r.mpi.library}: ${shortReason(r.mpi.error)})`
    }; mpiexec ${r.mpi.mpiexec ?? "absent"}`,
  );
  lines.push(
    `  cpu           ${r.cpu.model === undefined ? "" : `${r.cpu.model}; `}${plural(r.cpu.cores, "core")}${
      r.cpu.memoryBytes === undefined ? "" : `, ${gib(r.cpu.memoryBytes)}`
    }${r.cpu.avx512 === undefined ? "" : `; AVX-512 ${r.cpu.avx512 ? "yes" : "no"}`}; bf16 ${
      r.cpu.bf16Native ? `native (${r.cpu.bf16Flags?.join(" ") || "oneDNN ISA"})` : "not native"
    }${r.cpu.bf16Flags === undefined ? " (by oneDNN's ISA; /proc/cpuinfo needs --allow-all)" : ""}`,
    `  precision     auto -> ${r.precision.auto} (${r.precision.reason}); train.precision / --precision`,
    `  threads       ${plural(r.cpu.threads, "thread")} for native kernels (${
      r.cpu.threadsFrom === "SWAV_THREADS" ? "SWAV_THREADS" : "the core count; SWAV_THREADS=N changes it"
    })`,
    `  wasm heap     ${
      gib(r.wasmHeap.limitBytes)
    }; largest benchmark batch ${r.wasmHeap.largestBenchmarkBatch} ` +
      `(${r.wasmHeap.benchmark})`,
    `  data sets     Fashion-MNIST ${
      r.datasets.fashionMnist.present ? "at" : "absent from"
    } ${r.datasets.fashionMnist.path}`,
  );
  if (r.missing.length === 0) {
    lines.push("", "Nothing missing.");
  } else {
    lines.push("", "Missing (Debian packages):");
    for (const m of r.missing) lines.push(`  ${m.command}`, `      ${m.buys}`);
  }
  return lines.join("\n");
};

if (import.meta.main) {
  try {
    // Loaded here, not imported above: a dependency that needs a permission this run lacks (imagescript's
    // native codec wants --allow-ffi) fails the import, and the report must still say so and exit 0.
    const { Effect } = await import("effect");
    const { environmentReport } = await import("../pipelines/environment.ts");
    const report = await Effect.runPromise(environmentReport());
    console.log(Deno.args.includes("--json") ? JSON.stringify(report) : formatReport(report));
  } catch (error) {
    // A report, not a check: whatever went wrong is said, and the exit code stays 0.
    console.log(
      `doctor: could not finish the report: ${error instanceof Error ? error.message : String(error)}\n` +
        `Deno ${Deno.version.deno}; run it as \`deno task doctor\` (--allow-read --allow-env --allow-ffi --allow-sys).`,
    );
  }
  Deno.exit(0);
}
