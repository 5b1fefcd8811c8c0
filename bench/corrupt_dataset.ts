/**
 * The corrupt-input data set of issue 18, shared by test/corrupt_corpus_test.ts
 * and bench/reliability_probe.ts: an image folder with `train/` and `test/`
 * splits of two classes, good generated images (PNG and JPEG) mixed with the
 * corpus of test/fixtures/corrupt/ (see its manifest.json and
 * reference/make_corrupt_corpus.py), plus the special files that cannot be
 * committed (a directory and a FIFO with image names, a symlink loop), made
 * here at run time. Also: a CLI runner with a hard timeout, and a helper that
 * finds which file names a log mentions, in order.
 */
import { Image } from "imagescript";

export const corpusFolder = new URL("../test/fixtures/corrupt/", import.meta.url).pathname;
const cliPath = new URL("../cli/main.ts", import.meta.url).pathname;

export interface ManifestEntry {
  readonly name: string;
  readonly good: boolean;
  readonly why: string;
  readonly kind?: "directory" | "fifo" | "symlink-loop";
}

export interface CorruptManifest {
  readonly files: ReadonlyArray<ManifestEntry>;
  readonly runtime: ReadonlyArray<ManifestEntry>;
}

export const readManifest = async (): Promise<CorruptManifest> =>
  JSON.parse(await Deno.readTextFile(`${corpusFolder}manifest.json`));

/** A seeded 32-bit generator (mulberry32): the good images are the same on every run. */
const rng = (seed: number) => () => {
  seed = (seed + 0x6d2b79f5) | 0;
  let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
  t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
  return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
};

/** One good image: class 0 horizontal stripes, class 1 vertical, with seeded colours and noise. */
export const goodImage = async (
  label: number,
  seed: number,
  size: number,
  format: "png" | "jpg",
): Promise<Uint8Array> => {
  const random = rng(seed * 2 + label + 1);
  const image = new Image(size, size);
  const base = [random() * 255, random() * 255, random() * 255];
  const period = 3 + Math.floor(random() * 5);
  for (let y = 0; y < size; y++) {
    for (let x = 0; x < size; x++) {
      const on = Math.floor((label === 0 ? y : x) / period) % 2 === 0;
      const p = (y * size + x) * 4;
      for (let c = 0; c < 3; c++) {
        const v = (on ? base[c]! : 255 - base[c]!) + (random() - 0.5) * 40;
        image.bitmap[p + c] = Math.max(0, Math.min(255, Math.round(v)));
      }
      image.bitmap[p + 3] = 255;
    }
  }
  return format === "png" ? await image.encode() : await image.encodeJPEG(90);
};

export interface CorruptDataset {
  readonly root: string;
  /** Base names of the files that must be skipped and named (corpus and special files). */
  readonly bad: ReadonlyArray<string>;
  /** Base names of the corpus's good-but-unusual files (they must decode). */
  readonly unusual: ReadonlyArray<string>;
  /** Good images in `train/` (generated + unusual): what training and extraction must use. */
  readonly goodTrain: number;
  readonly goodTest: number;
}

/**
 * Writes `root/{train,test}/{a,b}/`: `perClass` good images per train class
 * (half PNG, half JPEG, named `good-<class>-NNN.<ext>`), `testPerClass` per test
 * class, and the corpus spread over the two train classes (alternately, in
 * manifest order), with the special files of the manifest's `runtime` list.
 */
export const writeCorruptDataset = async (
  root: string,
  options: { perClass: number; testPerClass: number; size: number; special?: boolean },
): Promise<CorruptDataset> => {
  const manifest = await readManifest();
  const classes = ["a", "b"];
  for (const [split, count] of [["train", options.perClass], ["test", options.testPerClass]] as const) {
    for (const [label, name] of classes.entries()) {
      const dir = `${root}/${split}/${name}`;
      await Deno.mkdir(dir, { recursive: true });
      for (let i = 0; i < count; i++) {
        const format = i % 2 === 0 ? "png" : "jpg";
        const seed = (split === "train" ? 0 : 10_000) + i;
        await Deno.writeFile(
          `${dir}/good-${name}-${String(i).padStart(3, "0")}.${format}`,
          await goodImage(label, seed, options.size, format),
        );
      }
    }
  }
  for (const [i, entry] of manifest.files.entries()) {
    await Deno.copyFile(`${corpusFolder}${entry.name}`, `${root}/train/${classes[i % 2]}/${entry.name}`);
  }
  const special = options.special ?? true;
  if (special) {
    for (const [i, entry] of manifest.runtime.entries()) {
      const path = `${root}/train/${classes[i % 2]}/${entry.name}`;
      if (entry.kind === "directory") await Deno.mkdir(path);
      else if (entry.kind === "symlink-loop") await Deno.symlink(entry.name, path);
      else if (entry.kind === "fifo") {
        const made = await new Deno.Command("mkfifo", { args: [path] }).output();
        if (!made.success) throw new Error(`mkfifo ${path} failed`);
      }
    }
  }
  const unusual = manifest.files.filter((e) => e.good).map((e) => e.name);
  return {
    root,
    bad: [...manifest.files, ...(special ? manifest.runtime : [])].filter((e) => !e.good).map((e) => e.name),
    unusual,
    goodTrain: 2 * options.perClass + unusual.length,
    goodTest: 2 * options.testPerClass,
  };
};

/** The tiny model and crops of the CLI tests: a step in a fraction of a second on wasm. */
export const tinyConfig = (source: string, train: Record<string, unknown>) => ({
  data: { source, workers: 1 },
  multicrop: { nmbCrops: [2], sizeCrops: [16], minScaleCrops: [0.3], maxScaleCrops: [1], blur: false },
  model: { arch: "resnet18", width: 4, stem: "cifar", hidden: 16, out: 8, prototypes: 20 },
  swav: { queueLength: 0, freezePrototypesIters: 2 },
  train,
});

export interface CliResult {
  readonly code: number;
  readonly stdout: string;
  readonly stderr: string;
  readonly timedOut: boolean;
  readonly seconds: number;
}

/**
 * The CLI's environment. SWAV_THREADS is pinned to 2, never 1: on today's main, 1 native thread with both
 * OpenBLAS and oneDNN loaded aborts pretrain with a corrupted heap (`malloc(): invalid size`), a separate
 * bug that would hide the ones measured here.
 */
const cliEnv = { NO_COLOR: "1", SWAV_BACKEND: "wasm", SWAV_THREADS: "2" };

/** Runs `deno run -A cli/main.ts ...args`, killed after `timeoutMs` (then `timedOut`). */
export const swav = async (
  args: string[],
  options: { timeoutMs?: number; env?: Record<string, string>; shell?: string } = {},
): Promise<CliResult> => {
  const started = performance.now();
  const controller = new AbortController();
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    controller.abort();
  }, options.timeoutMs ?? 120_000);
  // `shell` wraps the command (e.g. "ulimit -v 2000000; exec"): run through bash with "$@".
  const command = options.shell === undefined
    ? new Deno.Command(Deno.execPath(), {
      args: ["run", "--allow-all", cliPath, ...args],
      env: { ...cliEnv, ...options.env },
      stdout: "piped",
      stderr: "piped",
      signal: controller.signal,
    })
    : new Deno.Command("bash", {
      args: ["-c", `${options.shell} "$@"`, "swav", Deno.execPath(), "run", "--allow-all", cliPath, ...args],
      env: { ...cliEnv, ...options.env },
      stdout: "piped",
      stderr: "piped",
      signal: controller.signal,
    });
  try {
    const output = await command.output();
    return {
      code: output.code,
      stdout: new TextDecoder().decode(output.stdout),
      stderr: new TextDecoder().decode(output.stderr),
      timedOut,
      seconds: (performance.now() - started) / 1000,
    };
  } finally {
    clearTimeout(timer);
  }
};

/** The last line of stdout as JSON, or undefined. */
export const lastJson = (stdout: string): Record<string, unknown> | undefined => {
  try {
    return JSON.parse(stdout.trim().split("\n").at(-1) ?? "");
  } catch {
    return undefined;
  }
};

const escape = (s: string) => s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");

/** Which of `names` (file base names) `log` mentions as a path component, ordered by first mention. */
export const namesMentioned = (log: string, names: ReadonlyArray<string>): string[] =>
  names
    .map((name) => ({ name, at: log.search(new RegExp(`(^|[/\\s"'(])${escape(name)}(?![\\w.])`)) }))
    .filter((m) => m.at >= 0)
    .sort((x, y) => x.at - y.at)
    .map((m) => m.name);
