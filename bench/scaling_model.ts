/**
 * Data-parallel SwAV's communication cost, simulated for worlds larger than
 * one machine: what each rank all-reduces per training step, the time that
 * takes on a stated network, and the scaling efficiency that leaves.
 *
 *   deno run -A bench/scaling_model.ts [--measure | --compute-ms W16,W32] [--batch 64] [--bucket-mb 25] [--json]
 *
 * Weak scaling, as the reference trains: every worker keeps its batch (`--batch`, the reference's 64
 * per GPU) and P workers train on P times the images. Per step, each rank all-reduces
 * - the gradients: every trainable parameter in float32, in buckets of `--bucket-mb`;
 * - synchronised batch norm: per batch-norm call (each backbone layer once per resolution group, the
 *   head's once) one forward message (2C + 1 float64: the moments and the count) and one backward
 *   (2C float64: Σ dy and Σ dy·x̂), as backend/sync_batch_norm.ts sends them;
 * - distributed Sinkhorn (host path), per assignment crop: the extremes (2 float64), the total (1), the
 *   prototype sums (K float64) per iteration and one flag.
 * Time of one all-reduce of n bytes over P ranks, MPICH's algorithms (Thakur, Rabenseifner & Gropp
 * 2005): n ≤ 2 KiB recursive doubling, ⌈log2 P⌉·(α + n/β); larger, Rabenseifner's reduce-scatter +
 * allgather, 2⌈log2 P⌉·α + 2(P − 1)/P · n/β (a ring has the same bandwidth term and 2(P − 1)·α of
 * latency). Reduction arithmetic and any overlap with the backward are left out: our collectives are
 * blocking, so the estimate is efficiency = compute / (compute + communication).
 * The compute time is measured, not modelled: `--measure` times `bench/bench.ts --stage step` for one
 * process at `--batch` on this machine (each ResNet-18 configuration); `--compute-ms` gives the times.
 * For the reference's own setting (ResNet-50, 2x224+6x96, 64 GPUs x 64) no compute time is measured
 * here: the table gives its communication time and the compute time a step needs for 90% efficiency.
 */
import { modelParamSpecs, totalPrototypes } from "../models/model.ts";
import type { ModelConfig } from "../models/model.ts";

interface Setting {
  readonly name: string;
  readonly model: ModelConfig;
  /** Crops as COUNTxSIZE groups (each group one backbone pass, so one batch-norm call per layer). */
  readonly crops: string;
  /** Flags for bench/bench.ts, or undefined where this machine cannot time it. */
  readonly benchFlags?: readonly string[];
}

const resnet18 = (width: number): ModelConfig => ({
  arch: "resnet18",
  width,
  inputChannels: 3,
  stem: "cifar",
  hidden: 2048,
  out: 128,
  prototypes: 3000,
  syncBatchNorm: true,
});

const settings: readonly Setting[] = [
  {
    name: "ResNet-18 cifar w16, 2x32",
    model: resnet18(16),
    crops: "2x32",
    benchFlags: ["--width", "16", "--crops", "2x32"],
  },
  {
    name: "ResNet-18 cifar w32, 2x32+4x16",
    model: resnet18(32),
    crops: "2x32+4x16",
    benchFlags: ["--width", "32", "--crops", "2x32+4x16"],
  },
  {
    name: "ResNet-50, 2x224+6x96 (reference)",
    model: { ...resnet18(64), arch: "resnet50", stem: "imagenet" },
    crops: "2x224+6x96",
  },
];

interface Network {
  readonly name: string;
  /** Latency of one message, seconds. */
  readonly alpha: number;
  /** Bandwidth, bytes per second. */
  readonly beta: number;
}

const networks: readonly Network[] = [
  { name: "10 Gb/s Ethernet (α 30 µs, β 1.1 GB/s)", alpha: 30e-6, beta: 1.1e9 },
  { name: "100 Gb/s InfiniBand (α 2 µs, β 11 GB/s)", alpha: 2e-6, beta: 11e9 },
];

const WORLDS = [8, 16, 32, 64];
const SHORT_MESSAGE = 2048;

/** Seconds of one all-reduce of `bytes` over `p` ranks (MPICH's recursive doubling / Rabenseifner). */
const allReduceSeconds = (bytes: number, p: number, net: Network): number => {
  if (p <= 1) return 0;
  const steps = Math.ceil(Math.log2(p));
  return bytes <= SHORT_MESSAGE
    ? steps * (net.alpha + bytes / net.beta)
    : 2 * steps * net.alpha + (2 * (p - 1) / p) * bytes / net.beta;
};

/** The messages (bytes each) one rank all-reduces in one step, by kind. */
const messagesOf = (setting: Setting, bucketBytes: number, iterations = 3) => {
  const specs = modelParamSpecs(setting.model);
  const parameters = specs.filter((s) => s.trainable).reduce(
    (a, s) => a + s.shape.reduce((x, y) => x * y, 1),
    0,
  );
  const groups = setting.crops.split("+").length;
  const assignCrops = Math.min(2, setting.crops.split("+").reduce((a, g) => a + Number(g.split("x")[0]), 0));
  const gradientBytes = parameters * 4;
  const buckets = Math.ceil(gradientBytes / bucketBytes);
  const gradient = Array.from(
    { length: buckets },
    (_, i) => Math.min(bucketBytes, gradientBytes - i * bucketBytes),
  );
  const batchNorm: number[] = [];
  for (const s of specs.filter((s) => s.name.endsWith(".running_mean"))) {
    const channels = s.shape[0]!;
    const calls = s.name.startsWith("projection_head") ? 1 : groups;
    for (let c = 0; c < calls; c++) batchNorm.push((2 * channels + 1) * 8, 2 * channels * 8);
  }
  const sinkhorn: number[] = [];
  for (let c = 0; c < assignCrops; c++) {
    sinkhorn.push(16, 8, ...Array<number>(iterations).fill(totalPrototypes(setting.model) * 8), 8);
  }
  return { parameters, gradient, batchNorm, sinkhorn };
};

const argValue = (name: string): string | undefined => {
  const i = Deno.args.indexOf(name);
  return i >= 0 ? Deno.args[i + 1] : undefined;
};

/** Median step ms of one process at `batch`, from bench/bench.ts --json. */
const measureStep = async (flags: readonly string[], batch: number): Promise<number> => {
  const bench = new URL("./bench.ts", import.meta.url).pathname;
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", bench, "--stage", "step", "--json", "--batch", String(batch), ...flags],
    stdout: "piped",
    stderr: "inherit",
  }).output();
  const line = new TextDecoder().decode(out.stdout).split("\n").find((l) => l.includes('"stage":"step"'));
  if (!out.success || line === undefined) throw new Error(`bench/bench.ts ${flags.join(" ")} failed`);
  return (JSON.parse(line) as { ms: number }).ms;
};

const batch = Number(argValue("--batch") ?? "64");
const bucketBytes = Number(argValue("--bucket-mb") ?? "25") * 2 ** 20;
const json = Deno.args.includes("--json");
const given = argValue("--compute-ms")?.split(",").map(Number);
const computeMs: (number | undefined)[] = [];
for (const [i, s] of settings.entries()) {
  if (s.benchFlags === undefined) computeMs.push(undefined);
  else if (given !== undefined) computeMs.push(given[i]);
  else if (Deno.args.includes("--measure")) computeMs.push(await measureStep(s.benchFlags, batch));
  else computeMs.push(undefined);
}

const ms = (seconds: number) => seconds * 1000;
const rows: Record<string, unknown>[] = [];
for (const [i, setting] of settings.entries()) {
  const m = messagesOf(setting, bucketBytes);
  const bytes = (list: number[]) => list.reduce((a, b) => a + b, 0);
  for (const net of networks) {
    for (const p of WORLDS) {
      const time = (list: number[]) => ms(list.reduce((a, n) => a + allReduceSeconds(n, p, net), 0));
      const comm = { gradient: time(m.gradient), batchNorm: time(m.batchNorm), sinkhorn: time(m.sinkhorn) };
      const total = comm.gradient + comm.batchNorm + comm.sinkhorn;
      const compute = computeMs[i];
      rows.push({
        setting: setting.name,
        network: net.name,
        workers: p,
        parameters: m.parameters,
        gradientBytes: bytes(m.gradient),
        batchNormBytes: bytes(m.batchNorm),
        batchNormMessages: m.batchNorm.length,
        sinkhornBytes: bytes(m.sinkhorn),
        commMs: { ...comm, total },
        computeMs: compute,
        efficiency: compute === undefined ? undefined : compute / (compute + total),
        computeMsFor90: 9 * total,
      });
    }
  }
}

if (json) {
  for (const row of rows) console.log(JSON.stringify(row));
} else {
  const f = (v: number, d = 1) => v.toFixed(d);
  console.log(`weak scaling, ${batch} images per worker; gradient buckets of ${bucketBytes / 2 ** 20} MiB\n`);
  console.log(
    "| setting | network | workers | all-reduced per step (grad / BN / Sinkhorn) | comm ms (grad / BN / Sinkhorn) " +
      "| compute ms | efficiency | compute ms for 90% |",
  );
  console.log("| --- | --- | --: | --- | --- | --: | --: | --: |");
  for (
    const r of rows as {
      setting: string;
      network: string;
      workers: number;
      gradientBytes: number;
      batchNormBytes: number;
      batchNormMessages: number;
      sinkhornBytes: number;
      commMs: { gradient: number; batchNorm: number; sinkhorn: number; total: number };
      computeMs?: number;
      efficiency?: number;
      computeMsFor90: number;
    }[]
  ) {
    const mb = (b: number) => `${f(b / 2 ** 20, 2)} MiB`;
    const kb = (b: number) => `${f(b / 2 ** 10, 0)} KiB`;
    console.log(
      `| ${r.setting} | ${r.network} | ${r.workers} | ${mb(r.gradientBytes)} / ${kb(r.batchNormBytes)} ` +
        `(${r.batchNormMessages} msgs) / ${kb(r.sinkhornBytes)} | ${f(r.commMs.total)} ` +
        `(${f(r.commMs.gradient)} / ${f(r.commMs.batchNorm)} / ${f(r.commMs.sinkhorn)}) | ` +
        `${r.computeMs === undefined ? "-" : f(r.computeMs, 0)} | ` +
        `${r.efficiency === undefined ? "-" : `${f(100 * r.efficiency)}%`} | ${f(r.computeMsFor90, 0)} |`,
    );
  }
}
