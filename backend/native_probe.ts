/**
 * What a native library reports about itself, for `deno task doctor` and a
 * run's `environment.json`: the file the loader resolved, the version, and for
 * oneDNN the instruction set its JIT kernels dispatch to. Only reads: each
 * probe opens the library by the same name the kernels loaded it by (the
 * loader hands back the same mapping) and calls its query functions. Every
 * function here returns a value and never throws: a report must come out on
 * any machine, with whatever permissions it was given.
 */

const messageOf = (error: unknown): string =>
  error instanceof Error ? error.message.split("\n")[0]! : String(error);

/** Reads an environment variable; undefined when unset or without --allow-env. */
export const envValue = (name: string): string | undefined => {
  try {
    const value = Deno.env.get(name);
    return value === "" ? undefined : value;
  } catch {
    return undefined;
  }
};

const readText = (path: string): string | undefined => {
  try {
    return Deno.readTextFileSync(path);
  } catch {
    return undefined;
  }
};

const realPath = (path: string): string | undefined => {
  try {
    return Deno.realPathSync(path);
  } catch {
    return undefined;
  }
};

/** The loader's default folders (Debian multiarch first), after `LD_LIBRARY_PATH`. */
const loaderFolders = (): string[] => {
  const triplet = `${Deno.build.arch}-linux-gnu`;
  return [
    ...(envValue("LD_LIBRARY_PATH") ?? "").split(":").filter((folder) => folder !== ""),
    `/usr/lib/${triplet}`,
    `/lib/${triplet}`,
    "/usr/local/lib",
    "/usr/lib",
    "/lib",
  ];
};

/**
 * The file a loaded library maps from: a path is resolved through its links; a
 * soname is looked up in this process's mappings (`/proc/self/maps`) by its
 * stem (`libopenblas.so.0` finds `.../libopenblasp-r0.3.21.so`). Deno lets only
 * `--allow-all` read /proc, so otherwise the soname is resolved in the loader's
 * default folders, as ld.so would find it.
 */
export const mappedFile = (library: string): string | undefined => {
  if (library.includes("/")) return realPath(library);
  const stem = library.split(".so")[0]!;
  const maps = readText("/proc/self/maps");
  if (maps !== undefined) {
    for (const line of maps.split("\n")) {
      if (!line.includes("/")) continue;
      const path = line.slice(line.indexOf("/"));
      if (path.slice(path.lastIndexOf("/") + 1).startsWith(stem)) return path;
    }
  }
  for (const folder of loaderFolders()) {
    const path = realPath(`${folder}/${library}`);
    if (path !== undefined) return path;
  }
  return undefined;
};

/** oneDNN's `dnnl_cpu_isa_t` values (dnnl_types.h, 2.x). */
const dnnlIsaNames: Readonly<Record<number, string>> = {
  0x0: "all",
  0x1: "sse41",
  0x3: "avx",
  0x7: "avx2",
  0xf: "avx512_mic",
  0x1f: "avx512_mic_4ops",
  0x27: "avx512_core",
  0x67: "avx512_core_vnni",
  0xe7: "avx512_core_bf16",
  0x3e7: "avx512_core_amx",
  0x407: "avx2_vnni",
};
/** The bits of `avx512_core_bf16`: an ISA holding all of them runs bf16 natively (`amx` included). */
const DNNL_ISA_BF16 = 0xe7;

export interface DnnlDetails {
  readonly version?: string;
  /** The instruction set oneDNN's JIT kernels dispatch to on this CPU (`dnnl_get_effective_cpu_isa`). */
  readonly isa?: string;
  /** Whether that ISA has native bf16 instructions. */
  readonly bf16?: boolean;
  readonly error?: string;
}

/** Version and dispatch ISA of the oneDNN at `library` (the name `loadDnnl` opened). */
export const dnnlDetails = (library: string): DnnlDetails => {
  try {
    const lib = Deno.dlopen(library, {
      dnnl_version: { parameters: [], result: "pointer" },
      dnnl_get_effective_cpu_isa: { parameters: [], result: "i32" },
    });
    const pointer = lib.symbols.dnnl_version();
    // dnnl_version_t: int major, minor, patch; const char *hash; ...
    const view = pointer === null ? undefined : new Deno.UnsafePointerView(pointer);
    const version = view === undefined
      ? undefined
      : `${view.getInt32(0)}.${view.getInt32(4)}.${view.getInt32(8)}`;
    const isa = lib.symbols.dnnl_get_effective_cpu_isa();
    return {
      ...(version === undefined ? {} : { version }),
      isa: dnnlIsaNames[isa] ?? `0x${isa.toString(16)}`,
      bf16: (isa & DNNL_ISA_BF16) === DNNL_ISA_BF16,
    };
  } catch (error) {
    return { error: messageOf(error) };
  }
};

export interface OpenBlasDetails {
  readonly version?: string;
  /** `openblas_get_config()`, e.g. "OpenBLAS 0.3.21 DYNAMIC_ARCH NO_AFFINITY SkylakeX MAX_THREADS=64". */
  readonly config?: string;
  /** The kernel set OpenBLAS chose for this CPU (`openblas_get_corename()`). */
  readonly core?: string;
  readonly error?: string;
}

/** Version, build and kernel set of the OpenBLAS at `library` (the name `loadBlas` opened). */
export const openBlasDetails = (library: string): OpenBlasDetails => {
  try {
    const lib = Deno.dlopen(library, {
      openblas_get_config: { parameters: [], result: "pointer" },
      openblas_get_corename: { parameters: [], result: "pointer" },
    });
    const text = (pointer: Deno.PointerValue) =>
      pointer === null ? undefined : new Deno.UnsafePointerView(pointer).getCString().trim();
    const config = text(lib.symbols.openblas_get_config());
    const core = text(lib.symbols.openblas_get_corename());
    const version = config === undefined ? undefined : /OpenBLAS\s+(\S+)/.exec(config)?.[1];
    return {
      ...(version === undefined ? {} : { version }),
      ...(config === undefined ? {} : { config }),
      ...(core === undefined ? {} : { core }),
    };
  } catch (error) {
    return { error: messageOf(error) };
  }
};

/** The soname of MPICH's library (Debian's libmpich12), the scale-out work's transport. */
export const MPI_LIBRARY = "libmpich.so.12";

export interface MpiDetails {
  readonly found: boolean;
  /** The name tried: `SWAV_MPI_LIB`, else `libmpich.so.12`. */
  readonly library: string;
  readonly file?: string;
  /** The first line of `MPI_Get_library_version` (callable before `MPI_Init`). */
  readonly version?: string;
  readonly error?: string;
  /** `mpiexec` on PATH, or undefined. */
  readonly mpiexec?: string;
}

/** The first `name` on PATH (an existing file), or undefined. */
export const onPath = (name: string): string | undefined => {
  for (const folder of (envValue("PATH") ?? "").split(":")) {
    if (folder === "") continue;
    try {
      if (Deno.statSync(`${folder}/${name}`).isFile) return `${folder}/${name}`;
    } catch {
      // not there (or not readable)
    }
  }
  return undefined;
};

/** MPI: the library (`SWAV_MPI_LIB` or libmpich.so.12) and `mpiexec`. */
export const mpiDetails = (): MpiDetails => {
  const library = envValue("SWAV_MPI_LIB") ?? MPI_LIBRARY;
  const mpiexec = onPath("mpiexec");
  const launcher = mpiexec === undefined ? {} : { mpiexec };
  try {
    const lib = Deno.dlopen(library, {
      MPI_Get_library_version: { parameters: ["buffer", "buffer"], result: "i32" },
    });
    // MPI_MAX_LIBRARY_VERSION_STRING is 8192 in MPICH.
    const buffer = new Uint8Array(8192);
    const length = new Int32Array(1);
    const status = lib.symbols.MPI_Get_library_version(buffer, new Uint8Array(length.buffer));
    const text = status === 0
      ? new TextDecoder().decode(buffer.subarray(0, Math.min(buffer.length, Math.max(0, length[0]!))))
      : "";
    const version = text.split("\n")[0]?.replace(/\s+/g, " ").replace(/\0/g, "").trim();
    const file = mappedFile(library);
    return {
      found: true,
      library,
      ...(file === undefined ? {} : { file }),
      ...(version ? { version } : {}),
      ...launcher,
    };
  } catch (error) {
    return { found: false, library, error: messageOf(error), ...launcher };
  }
};

export interface CpuDetails {
  readonly model?: string;
  /** The bf16-related flags the kernel reports (`avx512_bf16`, `amx_bf16`, ...); undefined when unread. */
  readonly bf16Flags?: readonly string[];
  readonly avx512?: boolean;
}

/**
 * The CPU's model name and instruction-set flags that matter here (Linux's
 * /proc/cpuinfo; empty where it cannot be read: Deno grants /proc only to
 * `--allow-all`, and oneDNN's ISA then answers for bf16).
 */
export const cpuDetails = (): CpuDetails => {
  const text = readText("/proc/cpuinfo");
  if (text === undefined) return {};
  const field = (name: string) =>
    text.split("\n").find((line) => line.startsWith(name))?.split(":").slice(1).join(":").trim();
  const flags = new Set((field("flags") ?? "").split(/\s+/));
  const model = field("model name");
  return {
    ...(model === undefined ? {} : { model }),
    bf16Flags: ["avx512_bf16", "amx_bf16", "amx_tile"].filter((flag) => flags.has(flag)),
    avx512: flags.has("avx512f"),
  };
};
