/**
 * fp32 against bf16 training steps in one process, alternated round by round
 * (timings on a shared machine drift; alternating keeps the comparison fair).
 * The benchmark configuration of bench/bench.ts unless its model flags say otherwise.
 *
 *   deno run -A bench/precision_bench.ts [--threads N] [--rounds 3] [--reps 3] [bench.ts model flags]
 *
 * Prints per variant the median step ms over rounds (each round the median of
 * --reps steps), the same for the CPU time of all the process's threads, and
 * the peak tensor bytes of one step (tf.profile).
 */
import * as tf from "@tensorflow/tfjs";
import { Effect, ManagedRuntime } from "effect";
import { bf16Tuning } from "../backend/onednn.ts";
import { bf16Support } from "../backend/precision.ts";
import type { KernelSettings } from "../backend/kernel_settings.ts";
import { TensorBackend, withKernelSettings } from "../backend/tensor_backend.ts";
import { swavTape } from "../pipelines/swav_step.ts";
import { LarcSgd } from "../stages/optimise.ts";
import { makeFixture, parseBenchArgs, trainStep } from "./bench.ts";

interface Variant {
  readonly name: string;
  readonly precision: "fp32" | "bf16";
  /** bf16Tuning switches set for this variant's steps (the others at their defaults). */
  readonly tuning?: Partial<typeof bf16Tuning>;
  /** Kernel settings changed for this variant's steps. */
  readonly settings?: Partial<KernelSettings>;
}
const variants: Variant[] = [
  { name: "fp32", precision: "fp32" },
  { name: "bf16", precision: "bf16" },
  // The bf16 path before each of its speed-ups, for before/after ratios in one run.
  { name: "bf16, layer by layer on fp32 tensors", precision: "bf16", settings: { bf16Trunk: false } },
  {
    name: "bf16, dy rounded twice",
    precision: "bf16",
    tuning: { shareDy: false },
    settings: { bf16Trunk: false },
  },
  // Before the residual sums and ReLUs moved to oneDNN, in either precision.
  { name: "fp32, element-wise on wasm", precision: "fp32", settings: { nativeElementwise: false } },
  {
    name: "bf16, element-wise on wasm",
    precision: "bf16",
    settings: { nativeElementwise: false, bf16Trunk: false },
  },
];
const defaults = { ...bf16Tuning };

const value = (name: string, fallback: number): number => {
  const i = Deno.args.indexOf(name);
  return i < 0 ? fallback : Number(Deno.args[i + 1]);
};
const rounds = value("--rounds", 3);
const reps = value("--reps", 3);
const rest = Deno.args.filter((a, i, all) =>
  !["--rounds", "--reps"].includes(a) && !["--rounds", "--reps"].includes(all[i - 1] ?? "")
);
const o = parseBenchArgs(rest);
const support = bf16Support();
if (!support.native) {
  console.error(`precision_bench: bf16 is not native here (${support.reason})`);
  Deno.exit(1);
}
const runtime = ManagedRuntime.make(TensorBackend.layer("wasm", { threads: o.threads, blas: o.blas }));
await runtime.runPromise(Effect.service(TensorBackend));

const fixture = makeFixture(o);
const parts = swavTape(fixture.model, fixture.config, o.batch);
const optimisers = new Map(variants.map((v) => [v.name, new LarcSgd(fixture.optimiser.options, true)]));

const step = async (v: Variant) => {
  Object.assign(bf16Tuning, defaults, v.tuning ?? {});
  try {
    await withKernelSettings(
      { ...v.settings, precision: v.precision },
      () => trainStep(fixture, parts, optimisers.get(v.name)!),
    );
  } finally {
    Object.assign(bf16Tuning, defaults);
  }
};
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[xs.length >> 1]!;

/**
 * CPU ms of every thread of this process so far (/proc/self/task/N/schedstat, ns), or NaN off Linux.
 * On a machine other processes share, a step's CPU time moves much less with their load than its wall
 * time (OpenMP waits passively here, so idle workers add nothing).
 */
const cpuMs = (): number => {
  try {
    let ns = 0;
    for (const task of Deno.readDirSync("/proc/self/task")) {
      ns += Number(Deno.readTextFileSync(`/proc/self/task/${task.name}/schedstat`).split(" ")[0]);
    }
    return ns / 1e6;
  } catch {
    return NaN;
  }
};

const times = new Map<string, number[]>(variants.map((v) => [v.name, []]));
const cpu = new Map<string, number[]>(variants.map((v) => [v.name, []]));
const peaks = new Map<string, number>();
for (const v of variants) {
  await step(v); // warm-up: oneDNN primitives, V8 tiers
  peaks.set(v.name, (await tf.profile(() => step(v))).peakBytes);
}
for (let r = 0; r < rounds; r++) {
  for (const v of variants) {
    const [t, c]: number[][] = [[], []];
    for (let i = 0; i < reps; i++) {
      const [t0, c0] = [performance.now(), cpuMs()];
      await step(v);
      t.push(performance.now() - t0);
      c.push(cpuMs() - c0);
    }
    times.get(v.name)!.push(median(t));
    cpu.get(v.name)!.push(median(c));
  }
}
console.log(
  `threads ${o.threads}, ${rounds} rounds x ${reps} steps; load ${Deno.loadavg().map((x) => x.toFixed(1))}`,
);
console.log(
  `| variant | step ms (per round) | median | vs fp32 | CPU ms/step (per round) | median | vs fp32 | peak tensor MB |`,
);
console.log(
  `| ------- | ------------------- | -----: | ------: | ----------------------- | -----: | ------: | -------------: |`,
);
const base = median(times.get("fp32")!);
const cpuBase = median(cpu.get("fp32")!);
const f0 = (xs: number[]) => xs.map((x) => x.toFixed(0)).join(", ");
for (const v of variants) {
  const [t, c] = [times.get(v.name)!, cpu.get(v.name)!];
  const cells = [v.name, f0(t), median(t).toFixed(0), `${(median(t) / base).toFixed(2)}x`, f0(c)];
  cells.push(
    median(c).toFixed(0),
    `${(median(c) / cpuBase).toFixed(2)}x`,
    (peaks.get(v.name)! / 1e6).toFixed(0),
  );
  console.log(`| ${cells.join(" | ")} |`);
}
for (const opt of optimisers.values()) opt.dispose();
fixture.dispose();
await runtime.dispose();
