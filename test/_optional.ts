/**
 * The optional pieces tests need, detected in one place. A test that needs one
 * declares it: `Deno.test({ name: "... (needs chromium)", ...needs("chromium"), fn })`,
 * or `optionalTest` / `optionalStep`, which add the name suffix and the guard.
 *
 * - A missing piece makes the test `ignore`d, with the reason recorded for the
 *   run's closing line (test/zz_ignored_summary_test.ts prints
 *   `ignored: N (no chromium: 1, ...)`). Call `needs` once per test (a step:
 *   `optionalStep`, or `stepNeedsHardware`): each call that ignores is one tally.
 * - With `SWAV_REQUIRE_OPTIONAL=1` (CI) a missing piece is not ignored: the test
 *   runs and fails first, naming the Debian package that adds it.
 * - Hardware (a bf16 processor, a real GPU, the OS) is never a package:
 *   `needsHardware` ignores under either setting.
 *
 * Detection reuses the loaders the code uses, so the variables that name a
 * library file (`SWAV_BLAS_LIB`, `SWAV_DNNL_LIB`, `SWAV_TURBOJPEG_LIB`,
 * `SWAV_MPI_LIB`) decide here as they do at run time: a variable naming a
 * missing file is an absent library, whatever the system has. Programs are
 * looked up on PATH (mpiexec, chromium); Python is `SWAV_TEST_PYTHON`, else
 * Debian's /usr/bin/python3 (the first python3 on PATH may be another one).
 * Results are cached per test file.
 */
import { blasInfo, loadBlas } from "../backend/openblas.ts";
import { dnnlInfo, loadDnnl } from "../backend/onednn.ts";
import { turboJpeg, turboJpegLoadError } from "../backend/turbojpeg.ts";
import { cpuDetails, dnnlDetails, envValue, mpiDetails, onPath } from "../backend/native_probe.ts";
import { FASHION_MNIST_PATH } from "../pipelines/environment.ts";

/** Debian's Python with torch and friends: `SWAV_TEST_PYTHON`, else /usr/bin/python3. */
export const PYTHON = envValue("SWAV_TEST_PYTHON") ?? "/usr/bin/python3";

/** An optional piece a test can need; each is a Debian package (or a few). */
export type Piece =
  | "chromium"
  | "torch"
  | "torchvision"
  | "numpy"
  | "onnx"
  | "openblas"
  | "onednn"
  | "libjpeg-turbo"
  | "mpich"
  | "fashion-mnist"
  | "webgpu";

/** A capability of the machine, not a package: ignored where absent under either setting. */
export type Hardware = "bf16-cpu" | "gpu" | "linux";

interface Entry {
  /** How the closing line names its absence ("no <label>"). */
  readonly label: string;
  /** The Debian packages that add it. */
  readonly packages: readonly string[];
  /** Why it is missing, or undefined when present. */
  readonly detect: () => string | undefined;
}

const exists = (path: string): boolean => {
  try {
    Deno.statSync(path);
    return true;
  } catch {
    return false;
  }
};

/** The Debian browser that runs the report's page: the first of these on PATH. */
export const browserPath = (): string | undefined =>
  ["chromium-headless-shell", "chromium", "chromium-browser"].map(onPath).find((path) => path !== undefined);

/** Which of the Python modules import in `PYTHON` (one process for all four: torch is slow to import). */
let pythonModules: Map<string, string | undefined> | undefined;
const pythonModule = (module: string): string | undefined => {
  if (pythonModules === undefined) {
    pythonModules = new Map();
    const modules = ["torch", "torchvision", "numpy", "onnx"];
    const script = "import importlib, sys\n" +
      "for m in sys.argv[1:]:\n" +
      "    try:\n        importlib.import_module(m); print(m)\n" +
      "    except Exception:\n        pass\n";
    let found: string[] = [];
    let why = `${PYTHON} is not installed`;
    try {
      const out = new Deno.Command(PYTHON, { args: ["-c", script, ...modules], stderr: "null" }).outputSync();
      found = new TextDecoder().decode(out.stdout).split("\n").map((line) => line.trim());
      why = "";
    } catch {
      // no such interpreter
    }
    for (const m of modules) {
      pythonModules.set(m, found.includes(m) ? undefined : why || `${PYTHON} cannot import ${m}`);
    }
  }
  return pythonModules.get(module);
};

/** A Vulkan driver manifest the loader would read (VK_ICD_FILENAMES / VK_DRIVER_FILES, else its folders). */
const vulkanDrivers = (): string[] => {
  const listed = envValue("VK_DRIVER_FILES") ?? envValue("VK_ICD_FILENAMES");
  if (listed !== undefined) return listed.split(":").filter(exists);
  const folders = ["/usr/share/vulkan/icd.d", "/etc/vulkan/icd.d", "/usr/local/share/vulkan/icd.d"];
  return folders.flatMap((folder) => {
    try {
      return [...Deno.readDirSync(folder)].map((entry) => `${folder}/${entry.name}`);
    } catch {
      return [];
    }
  });
};

const loads = (library: string): boolean => {
  try {
    Deno.dlopen(library, {}).close();
    return true;
  } catch {
    return false;
  }
};

const entries: Readonly<Record<Piece, Entry>> = {
  chromium: {
    label: "chromium",
    packages: ["chromium-headless-shell"],
    detect: () => browserPath() === undefined ? "no chromium-headless-shell or chromium on PATH" : undefined,
  },
  torch: { label: "python3 torch", packages: ["python3-torch"], detect: () => pythonModule("torch") },
  torchvision: {
    label: "python3 torchvision",
    packages: ["python3-torchvision"],
    detect: () => pythonModule("torchvision"),
  },
  numpy: { label: "python3 numpy", packages: ["python3-numpy"], detect: () => pythonModule("numpy") },
  onnx: { label: "python3 onnx", packages: ["python3-onnx"], detect: () => pythonModule("onnx") },
  openblas: {
    label: "OpenBLAS",
    packages: ["libopenblas0-pthread"],
    detect: () => loadBlas() === undefined ? blasInfo().reason ?? "not loaded" : undefined,
  },
  onednn: {
    label: "oneDNN",
    packages: ["libdnnl2"],
    detect: () => loadDnnl() === undefined ? dnnlInfo().reason ?? "not loaded" : undefined,
  },
  "libjpeg-turbo": {
    label: "libjpeg-turbo",
    packages: ["libturbojpeg0"],
    detect: () => turboJpeg() === null ? turboJpegLoadError() : undefined,
  },
  mpich: {
    label: "MPICH",
    packages: ["mpich", "libmpich12"],
    detect: () => {
      const mpi = mpiDetails();
      const gaps = [
        ...(mpi.found ? [] : [`${mpi.library} does not load`]),
        ...(mpi.mpiexec === undefined ? ["no mpiexec on PATH"] : []),
      ];
      return gaps.length === 0 ? undefined : gaps.join(", ");
    },
  },
  "fashion-mnist": {
    label: "Fashion-MNIST",
    packages: ["dataset-fashion-mnist"],
    detect: () =>
      exists(`${FASHION_MNIST_PATH}/train-images-idx3-ubyte.gz`) ||
        exists(`${FASHION_MNIST_PATH}/train-images-idx3-ubyte`)
        ? undefined
        : `no Fashion-MNIST files in ${FASHION_MNIST_PATH}`,
  },
  webgpu: {
    label: "WebGPU adapter",
    packages: ["mesa-vulkan-drivers", "libvulkan1"],
    detect: () =>
      !loads("libvulkan.so.1")
        ? "libvulkan.so.1 does not load"
        : vulkanDrivers().length === 0
        ? "no Vulkan driver (Mesa's software one is lvp)"
        : undefined,
  },
};

const hardware: Readonly<Record<Hardware, { label: string; detect: () => string | undefined }>> = {
  "bf16-cpu": {
    label: "bf16 CPU",
    detect: () => {
      const flags = cpuDetails().bf16Flags ?? [];
      const dnnl = loadDnnl();
      const isa = dnnl === undefined ? undefined : dnnlDetails(dnnl.library);
      return flags.length > 0 || isa?.bf16 === true ? undefined : "this processor has no native bf16";
    },
  },
  gpu: {
    label: "GPU",
    detect: () =>
      vulkanDrivers().some((file) => !/lvp|swiftshader/.test(file)) &&
        (exists("/dev/dri/renderD128") || exists("/dev/nvidia0"))
        ? undefined
        : "no real GPU here",
  },
  linux: {
    label: "Linux",
    detect: () => Deno.build.os === "linux" ? undefined : `${Deno.build.os} is not Linux`,
  },
};

const cache = new Map<string, string | undefined>();
const missingReason = (key: string, detect: () => string | undefined): string | undefined => {
  if (!cache.has(key)) cache.set(key, detect());
  return cache.get(key);
};

/** Whether `SWAV_REQUIRE_OPTIONAL=1`: a missing package fails its test instead of ignoring it. */
export const requireOptional = (): boolean => envValue("SWAV_REQUIRE_OPTIONAL") === "1";

/** Where this run's ignores are tallied: one file per `deno test` process (every test file runs in it). */
export const tallyFile = (): string => `${envValue("TMPDIR") ?? "/tmp"}/swav-test-ignored-${Deno.pid}.jsonl`;

/** Which a `needs` call is for: Deno counts ignored tests and ignored steps apart. */
type Kind = "test" | "step";

const record = (labels: readonly string[], kind: Kind) => {
  try {
    Deno.writeTextFileSync(tallyFile(), JSON.stringify({ kind, missing: labels }) + "\n", { append: true });
  } catch {
    // no write permission: the closing line then undercounts, which it says (see the summary test)
  }
};

/** What a test's options get: spread it (`...needs("torch")`); `guard` wraps its body. */
export interface Need {
  readonly ignore: boolean;
  /** "no python3 torch (apt-get install python3-torch): ..." for each missing piece; "" when none. */
  readonly reason: string;
  /** For the test's name: "needs chromium, python3 torch". */
  readonly what: string;
  /** The body, failing first (naming the Debian packages) where a required piece is missing. */
  readonly guard: <A extends unknown[], R>(fn: (...args: A) => R) => (...args: A) => R;
}

/** The pieces a test needs: `ignore` where one is missing (a failure under `SWAV_REQUIRE_OPTIONAL=1`). */
export const needs = (...pieces: readonly Piece[]): Need => needsFor("test", pieces);

const needsFor = (kind: Kind, pieces: readonly Piece[]): Need => {
  const missing = pieces.flatMap((piece) => {
    const why = missingReason(piece, entries[piece].detect);
    return why === undefined ? [] : [{ entry: entries[piece], why }];
  });
  const reason = missing
    .map(({ entry, why }) => `no ${entry.label} (apt-get install ${entry.packages.join(" ")}): ${why}`)
    .join("; ");
  const ignore = missing.length > 0 && !requireOptional();
  if (ignore) record(missing.map(({ entry }) => `no ${entry.label}`), kind);
  const fail = missing.length > 0 && !ignore;
  return {
    ignore,
    reason,
    what: `needs ${pieces.map((piece) => entries[piece].label).join(", ")}`,
    guard: (fn) => (...args) => {
      if (fail) {
        const packages = missing.flatMap(({ entry }) => entry.packages).join(" ");
        throw new Error(
          `missing package (SWAV_REQUIRE_OPTIONAL=1 makes it a failure): apt-get install ${packages}; ${reason}`,
        );
      }
      return fn(...args);
    },
  };
};

/** Capabilities of the machine (not packages): `ignore` where absent, under either setting. */
export const needsHardware = (...capabilities: readonly Hardware[]): Need =>
  hardwareFor("test", capabilities);

/** `t.step` options for a step needing hardware: ignored where absent, under either setting. */
export const stepNeedsHardware = (...capabilities: readonly Hardware[]): Need =>
  hardwareFor("step", capabilities);

const hardwareFor = (kind: Kind, capabilities: readonly Hardware[]): Need => {
  const missing = capabilities.flatMap((capability) => {
    const why = missingReason(`hardware:${capability}`, hardware[capability].detect);
    return why === undefined ? [] : [{ label: hardware[capability].label, why }];
  });
  if (missing.length > 0) record(missing.map(({ label }) => `no ${label}`), kind);
  return {
    ignore: missing.length > 0,
    reason: missing.map(({ label, why }) => `no ${label}: ${why}`).join("; "),
    what: `needs ${capabilities.map((capability) => hardware[capability].label).join(", ")}`,
    guard: (fn) => fn,
  };
};

/** Whether every piece is here (no tally, no failure): for a choice inside a test that runs either way. */
export const present = (piece: Piece): boolean => missingReason(piece, entries[piece].detect) === undefined;

/** The Debian packages that add `piece`. */
export const packagesOf = (piece: Piece): readonly string[] => entries[piece].packages;

type Body = (t: Deno.TestContext) => void | Promise<void>;

/** `Deno.test` for a test needing `pieces`: its name says so, ignored (or failing) where one is missing. */
export const optionalTest = (
  name: string,
  pieces: readonly Piece[],
  fn: Body,
  options: Omit<Deno.TestDefinition, "name" | "fn" | "ignore"> = {},
): void => {
  const need = needs(...pieces);
  Deno.test({ ...options, name: `${name} (${need.what})`, ignore: need.ignore, fn: need.guard(fn) });
};

/** `t.step` for a step needing `pieces`, named and ignored the same way. */
export const optionalStep = (
  t: Deno.TestContext,
  name: string,
  pieces: readonly Piece[],
  fn: Body,
): Promise<boolean> => {
  const need = needsFor("step", pieces);
  return t.step({ name: `${name} (${need.what})`, ignore: need.ignore, fn: need.guard(fn) });
};

/**
 * A bf16 test: it needs a bf16 processor (hardware: ignored where absent, under either setting) and
 * oneDNN with OpenBLAS (packages: ignored, or failing under SWAV_REQUIRE_OPTIONAL=1); each tallied for
 * the closing line. Called once per test.
 */
export const bf16Test = (name: string, fn: () => Promise<void>, pieces: readonly Piece[] = []): void => {
  const cpu = needsHardware("bf16-cpu");
  const libs = needs("openblas", "onednn", ...pieces);
  Deno.test({
    name: `${name} (${cpu.what}; ${libs.what})`,
    ignore: cpu.ignore || libs.ignore,
    fn: libs.guard(fn),
  });
};
