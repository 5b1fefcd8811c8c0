/**
 * What this machine gives swav-ts: runtime and package versions, the backend
 * `auto` picks and why, the native libraries the wasm kernels found (file,
 * version, instruction set), libjpeg-turbo, MPI, cores and threads, the wasm
 * heap, optional data sets, and for each missing piece the command that adds it
 * with what it buys (measured figures, the sources named where they are listed).
 *
 * `environmentReport` is `deno task doctor --json`, and the record a run keeps
 * (`environment.json`) so its speed can be explained later; `speedupHint` is the
 * one line `pretrain`, `demo` and `bench` print at start when a piece that would
 * make them faster is missing. Every probe reuses the loader the kernels use
 * (backend/openblas.ts, backend/onednn.ts, backend/turbojpeg.ts), so the report says what a run gets.
 */
import * as tf from "@tensorflow/tfjs";
import { Effect } from "effect";
import denoConfig from "../deno.json" with { type: "json" };
import { defaultThreads } from "../backend/kernel_settings.ts";
import { dnnlInfo } from "../backend/onednn.ts";
import { bf16Support } from "../backend/precision.ts";
import { blasInfo } from "../backend/openblas.ts";
import { turboJpegLibrary, turboJpegLoadError } from "../backend/turbojpeg.ts";
import {
  cpuDetails,
  dnnlDetails,
  envValue,
  mappedFile,
  type MpiDetails,
  mpiDetails,
  openBlasDetails,
} from "../backend/native_probe.ts";
import { autoBackend, type BackendName, probeWebGpu, type WebGpuAdapter } from "../backend/tensor_backend.ts";
import { decodeModelConfig, estimateMemory } from "../models/model.ts";
import { WASM_HEAP_BYTES } from "../stages/encode.ts";
import { jpegBackend } from "../data/image_codec.ts";

/** A library the wasm kernels or the decoder can load. */
export interface LibraryStatus {
  readonly found: boolean;
  /** The name tried (the environment variable's value, else the soname). */
  readonly library: string;
  /** The variable that names another file. */
  readonly variable: string;
  readonly file?: string;
  readonly version?: string;
  /** Turned off by the user (`SWAV_BLAS=0`, `SWAV_DNNL=0`): not missing. */
  readonly disabled?: boolean;
  readonly error?: string;
  readonly [detail: string]: unknown;
}

/** A piece this machine lacks: the command that adds it and what it buys. */
export interface MissingPiece {
  readonly piece: "native-kernels" | "libjpeg-turbo" | "webgpu-software" | "mpi" | "fashion-mnist";
  readonly packages: readonly string[];
  readonly command: string;
  readonly buys: string;
  /** Whether runs get faster with it (what the start-of-run hint is about). */
  readonly speedsUpRuns: boolean;
}

export interface EnvironmentReport {
  /** What `train.precision: auto` picks here and why; a run's environment.json adds the one it ran with. */
  readonly precision: { readonly auto: "fp32" | "bf16"; readonly reason: string; readonly run?: string };
  readonly deno: { readonly version: string; readonly v8: string; readonly typescript: string };
  readonly os: string;
  /** Versions pinned in deno.json's import map. */
  readonly packages: Readonly<Record<string, string>>;
  readonly backend: {
    /** `SWAV_BACKEND`, else `auto`. */
    readonly requested: string;
    /** What `auto` picks here. */
    readonly auto: "webgpu" | "wasm";
    readonly reason: string;
    /** The WebGPU adapter, null when none, "not probed" when the caller skipped it. */
    readonly webgpu: WebGpuAdapter | null | "not probed";
  };
  /** The kernels the wasm backend runs on, e.g. "wasm + oneDNN + OpenBLAS". */
  readonly kernels: string;
  readonly native: { readonly openblas: LibraryStatus; readonly onednn: LibraryStatus };
  readonly cpu: {
    readonly model?: string;
    readonly cores: number;
    /** The threads native kernels use: `SWAV_THREADS`, else the core count. */
    readonly threads: number;
    readonly threadsFrom: "SWAV_THREADS" | "core count";
    readonly memoryBytes?: number;
    /** From /proc/cpuinfo, absent where it cannot be read (Deno lets only --allow-all read /proc). */
    readonly avx512?: boolean;
    readonly bf16Flags?: readonly string[];
    /** Whether bf16 maths would run on native instructions (CPU flags or oneDNN's ISA). */
    readonly bf16Native: boolean;
  };
  readonly jpeg: LibraryStatus & { readonly decoder: "turbojpeg" | "imagescript" };
  readonly mpi: MpiDetails;
  readonly wasmHeap: {
    readonly limitBytes: number;
    /** The benchmark configuration (bench/bench.ts defaults) and the largest batch `estimateMemory` fits. */
    readonly benchmark: string;
    readonly largestBenchmarkBatch: number;
  };
  readonly datasets: { readonly fashionMnist: { readonly path: string; readonly present: boolean } };
  readonly missing: readonly MissingPiece[];
}

/** The measured gains each missing piece would bring (sources named). */
export const measuredGains = {
  nativeKernels: "training 3.3x faster (a demo epoch took 16 s on wasm alone, 4.8 s with them)",
  turboJpeg: "JPEG decoding about 7x faster (314 against 45 images/s, BENCHMARKS.md 'decode, 500x375 JPEGs')",
} as const;

/** Where Debian keeps Fashion-MNIST (`dataset-fashion-mnist`). */
export const FASHION_MNIST_PATH = "/usr/share/datasets/fashion-mnist";

/**
 * The benchmark configuration's model and crops: bench/bench.ts's defaults (ResNet-18, cifar stem, width
 * 16, head 2048/128, 3000 prototypes, 2x32 px); test/doctor_test.ts checks they still agree.
 */
export const benchmarkModel = {
  arch: "resnet18",
  width: 16,
  stem: "cifar",
  hidden: 2048,
  out: 128,
  prototypes: 3000,
} as const;
export const benchmarkCrops = { sizeCrops: [32], nmbCrops: [2] } as const;

/** The largest batch whose estimated step (`estimateMemory`) fits the wasm heap. */
const largestBenchmarkBatch = Effect.gen(function* () {
  const config = yield* decodeModelConfig(benchmarkModel);
  const fits = (batch: number) => estimateMemory(config, batch, benchmarkCrops).totalBytes <= WASM_HEAP_BYTES;
  if (!fits(1)) return 0;
  let low = 1; // fits
  let high = 2;
  while (fits(high)) {
    low = high;
    high *= 2;
  }
  while (high - low > 1) {
    const mid = Math.floor((low + high) / 2);
    if (fits(mid)) low = mid;
    else high = mid;
  }
  return low;
}).pipe(Effect.orElseSucceed(() => 0));

/** `npm:effect@4.1.0` -> `4.1.0`. */
const pinnedVersions = (): Record<string, string> => {
  const imports = (denoConfig as { imports?: Record<string, string> }).imports ?? {};
  return Object.fromEntries(
    Object.entries(imports)
      .filter(([name]) => !name.endsWith("/"))
      .map(([name, target]) => [name, /@([^@/]+)\/?$/.exec(target)?.[1] ?? target]),
  );
};

const exists = (path: string): boolean => {
  try {
    Deno.statSync(path);
    return true;
  } catch {
    return false;
  }
};

const memoryBytes = (): number | undefined => {
  try {
    return Deno.systemMemoryInfo().total;
  } catch {
    return undefined; // no --allow-sys
  }
};

/** `fields` without its undefined entries: the report lists only what is known. */
const known = (fields: Record<string, unknown>): Record<string, unknown> =>
  Object.fromEntries(Object.entries(fields).filter(([, value]) => value !== undefined));

/**
 * A native library's status: where the kernels loaded it from and what it says of itself
 * (`details`), or the name tried and why it did not load. `switchVariable` = "0" turns it off.
 */
const libraryStatus = (
  variable: string,
  soname: string,
  switchVariable: string,
  info: { readonly active: boolean; readonly library?: string; readonly reason?: string },
  details: (library: string) => Record<string, unknown> & { readonly error?: string },
): LibraryStatus => {
  if (info.library === undefined) {
    const disabled = envValue(switchVariable) === "0";
    return {
      found: false,
      library: envValue(variable) ?? soname,
      variable,
      ...(disabled ? { disabled } : {}),
      error: info.reason ?? "not loaded",
    };
  }
  const { error, ...rest } = details(info.library);
  return {
    found: true,
    library: info.library,
    variable,
    ...known({ file: mappedFile(info.library), ...rest }),
    ...(info.active ? {} : { disabled: true }),
    ...known({ error }),
  } as LibraryStatus;
};

const openBlasStatus = (): LibraryStatus =>
  libraryStatus("SWAV_BLAS_LIB", "libopenblas.so.0", "SWAV_BLAS", blasInfo(), (library) => {
    const { version, config, core, error } = openBlasDetails(library);
    return { version, core, config, error };
  });

const oneDnnStatus = (): LibraryStatus =>
  libraryStatus("SWAV_DNNL_LIB", "libdnnl.so.2", "SWAV_DNNL", dnnlInfo(), (library) => {
    const { version, isa, bf16, error } = dnnlDetails(library);
    return { version, isa, bf16, error };
  });

const jpegStatus = (): EnvironmentReport["jpeg"] => {
  const decoder = jpegBackend();
  const library = turboJpegLibrary();
  const variable = "SWAV_TURBOJPEG_LIB";
  if (decoder === "imagescript") {
    return { found: false, library, variable, decoder, error: turboJpegLoadError() };
  }
  const file = mappedFile(library);
  // The soname's minor numbers are the only version libturbojpeg states (libturbojpeg.so.0.2.0).
  const version = file === undefined ? undefined : /\.so\.(\d+(?:\.\d+)*)$/.exec(file)?.[1];
  return {
    found: true,
    library,
    variable,
    decoder,
    ...(file === undefined ? {} : { file }),
    ...(version === undefined ? {} : { version: `so ${version}` }),
  };
};

/**
 * The kernels a run is on now, e.g. "wasm + oneDNN + OpenBLAS" (for reports); another backend's name as is.
 * oneDNN's convolutions run only where OpenBLAS is on too (backend/wasm_kernels.ts).
 */
export const activeKernels = (backendName: string): string => {
  if (backendName !== "wasm") return backendName;
  const blas = blasInfo().active;
  return ["wasm", ...(blas && dnnlInfo().active ? ["oneDNN"] : []), ...(blas ? ["OpenBLAS"] : [])].join(
    " + ",
  );
};

/** The kernels the wasm backend runs on; oneDNN's convolutions run only where OpenBLAS is on too. */
export const kernelsLabel = (
  native: { readonly openblas: LibraryStatus; readonly onednn: LibraryStatus },
): string => {
  const blas = native.openblas.found && !native.openblas.disabled;
  const dnnl = blas && native.onednn.found && !native.onednn.disabled;
  return ["wasm", ...(dnnl ? ["oneDNN"] : []), ...(blas ? ["OpenBLAS"] : [])].join(" + ");
};

const apt = (packages: readonly string[]) => `apt-get install ${packages.join(" ")}`;

const missingPieces = (
  r: Omit<EnvironmentReport, "missing">,
): MissingPiece[] => {
  const pieces: MissingPiece[] = [];
  const kernelPackages = [
    ...(!r.native.openblas.found && !r.native.openblas.disabled ? ["libopenblas0-pthread"] : []),
    ...(!r.native.onednn.found && !r.native.onednn.disabled ? ["libdnnl2"] : []),
  ];
  if (kernelPackages.length > 0) {
    pieces.push({
      piece: "native-kernels",
      packages: kernelPackages,
      command: apt(kernelPackages),
      buys: `native oneDNN + OpenBLAS kernels on wasm: ${measuredGains.nativeKernels}`,
      speedsUpRuns: true,
    });
  }
  if (!r.jpeg.found) {
    pieces.push({
      piece: "libjpeg-turbo",
      packages: ["libturbojpeg0"],
      command: apt(["libturbojpeg0"]),
      buys: measuredGains.turboJpeg,
      speedsUpRuns: true,
    });
  }
  if (r.backend.webgpu === null) {
    const packages = ["mesa-vulkan-drivers", "libvulkan1"];
    pieces.push({
      piece: "webgpu-software",
      packages,
      command: apt(packages),
      buys: "a software WebGPU adapter: the webgpu backend and its tests run on this CPU " +
        "(auto does not pick a fallback adapter, so no speed-up)",
      speedsUpRuns: false,
    });
  }
  if (!r.mpi.found || r.mpi.mpiexec === undefined) {
    const packages = [
      ...(!r.mpi.found ? ["libmpich12"] : []),
      ...(r.mpi.mpiexec === undefined ? ["mpich"] : []),
    ];
    pieces.push({
      piece: "mpi",
      packages,
      command: apt(packages),
      buys: "MPICH for the multi-process scale-out work (not measured yet)",
      speedsUpRuns: false,
    });
  }
  if (!r.datasets.fashionMnist.present) {
    pieces.push({
      piece: "fashion-mnist",
      packages: ["dataset-fashion-mnist"],
      command: apt(["dataset-fashion-mnist"]),
      buys:
        `real labelled data at ${FASHION_MNIST_PATH} (bench/configs/fashion-mnist.json, the reader tests)`,
      speedsUpRuns: false,
    });
  }
  return pieces;
};

/**
 * Everything this machine gives swav-ts. Never fails. `webgpu: false` skips the
 * WebGPU probe (a run that asked for another backend need not wake a GPU driver).
 */
export const environmentReport = (
  options: { readonly webgpu?: boolean } = {},
): Effect.Effect<EnvironmentReport> =>
  Effect.gen(function* () {
    const adapter = options.webgpu === false
      ? "not probed" as const
      : yield* Effect.promise(() => probeWebGpu()).pipe(Effect.orElseSucceed(() => null));
    const auto = autoBackend(adapter === "not probed" ? null : adapter);
    const reason = adapter === "not probed"
      ? "WebGPU not probed; without a real adapter auto takes wasm"
      : adapter === null
      ? "no WebGPU adapter found"
      : adapter.fallback
      ? `the WebGPU adapter (${adapter.description}) is a fallback (software) one`
      : `a real WebGPU adapter: ${adapter.description}`;
    const native = { openblas: openBlasStatus(), onednn: oneDnnStatus() };
    const cpu = cpuDetails();
    const threadsEnv = envValue("SWAV_THREADS");
    const threads = defaultThreads();
    const memory = memoryBytes();
    const support = bf16Support();
    const partial = {
      precision: { auto: support.native ? "bf16" as const : "fp32" as const, reason: support.reason },
      deno: { version: Deno.version.deno, v8: Deno.version.v8, typescript: Deno.version.typescript },
      os: `${Deno.build.os} ${Deno.build.arch}`,
      packages: { ...pinnedVersions(), "@tensorflow/tfjs (loaded)": tf.version.tfjs },
      backend: { requested: envValue("SWAV_BACKEND") ?? "auto", auto, reason, webgpu: adapter },
      kernels: kernelsLabel(native),
      native,
      cpu: {
        ...(cpu.model === undefined ? {} : { model: cpu.model }),
        cores: Math.max(1, navigator.hardwareConcurrency ?? 1),
        threads,
        threadsFrom: threadsEnv !== undefined && String(threads) === threadsEnv.trim()
          ? "SWAV_THREADS" as const
          : "core count" as const,
        ...(memory === undefined ? {} : { memoryBytes: memory }),
        ...(cpu.avx512 === undefined ? {} : { avx512: cpu.avx512 }),
        ...(cpu.bf16Flags === undefined ? {} : { bf16Flags: cpu.bf16Flags }),
        bf16Native: (cpu.bf16Flags?.length ?? 0) > 0 || native.onednn["bf16"] === true,
      },
      jpeg: jpegStatus(),
      mpi: mpiDetails(),
      wasmHeap: {
        limitBytes: WASM_HEAP_BYTES,
        benchmark: `${benchmarkModel.arch} width ${benchmarkModel.width}, ${benchmarkModel.stem} stem, ` +
          `${benchmarkCrops.nmbCrops[0]}x${benchmarkCrops.sizeCrops[0]} px crops, head ` +
          `${benchmarkModel.hidden}/${benchmarkModel.out}, ${benchmarkModel.prototypes} prototypes`,
        largestBenchmarkBatch: yield* largestBenchmarkBatch,
      },
      datasets: {
        fashionMnist: {
          path: FASHION_MNIST_PATH,
          present: exists(`${FASHION_MNIST_PATH}/train-images-idx3-ubyte.gz`) ||
            exists(`${FASHION_MNIST_PATH}/train-images-idx3-ubyte`),
        },
      },
    };
    return { ...partial, missing: missingPieces(partial) };
  });

/** What a run will do, for the hint: the backend asked for, and whether it reads JPEG files. */
export interface HintOptions {
  /** flag, else SWAV_BACKEND, else the config's (default auto). */
  readonly backend: BackendName;
  /** The run decodes JPEG files (false for the demo's and the benchmark's PNGs). */
  readonly jpeg: boolean;
  /** Native kernels turned off on purpose (`bench --no-blas`). */
  readonly nativeOff?: boolean;
}

/**
 * The one start-of-run line when a piece that would make this run faster is
 * missing (packages and measured speed-up), else undefined. Native kernels
 * count only where the run lands on wasm.
 */
export const speedupHint = (report: EnvironmentReport, options: HintOptions): string | undefined => {
  const onWasm = options.backend === "wasm" || (options.backend === "auto" && report.backend.auto === "wasm");
  const pieces = report.missing.filter((p) =>
    p.speedsUpRuns &&
    ((p.piece === "native-kernels" && onWasm && !options.nativeOff) ||
      (p.piece === "libjpeg-turbo" && options.jpeg))
  );
  if (pieces.length === 0) return undefined;
  const packages = pieces.flatMap((p) => p.packages);
  const gains = pieces.map((p) =>
    p.piece === "native-kernels" ? measuredGains.nativeKernels : measuredGains.turboJpeg
  );
  return `hint: \`${apt(packages)}\` for ${gains.join(" and ")}. ` +
    "`deno task doctor` shows what this machine has.";
};

let hintShown = false;

/**
 * Writes the start-of-run hint to stderr, at most once per process (the demo's
 * inner pretrain, or a second command in one process, stays quiet). The
 * report skips the WebGPU probe unless `auto` needs it.
 */
export const announceSpeedupHint = (options: HintOptions): Effect.Effect<void> =>
  Effect.gen(function* () {
    if (hintShown) return;
    hintShown = true;
    const report = yield* environmentReport({ webgpu: options.backend === "auto" });
    const line = speedupHint(report, options);
    if (line !== undefined) {
      yield* Effect.sync(() => Deno.stderr.writeSync(new TextEncoder().encode(`${line}\n`)));
    }
  }).pipe(Effect.catchCause(() => Effect.void));
