/**
 * fp32 against bf16 training steps in one process, alternated round by round
 * (timings on a shared machine drift; alternating keeps the comparison fair).
 * The benchmark configuration of bench/bench.ts unless its model flags say otherwise.
 *
 *   deno run -A bench/precision_bench.ts [--threads N] [--rounds 3] [--reps 3] [bench.ts model flags]
 *
 * Prints per precision the median step ms over rounds (each round the median of
 * --reps steps) and the peak tensor bytes of one step (tf.profile).
 */
import * as tf from "@tensorflow/tfjs";
import { Effect, ManagedRuntime } from "effect";
import { bf16Support } from "../backend/precision.ts";
import { TensorBackend, withKernelSettings } from "../backend/tensor_backend.ts";
import { swavTape } from "../pipelines/swav_step.ts";
import { LarcSgd } from "../stages/optimise.ts";
import { makeFixture, parseBenchArgs, trainStep } from "./bench.ts";

interface Variant {
  readonly name: string;
  readonly precision: "fp32" | "bf16";
}
const variants: Variant[] = [
  { name: "fp32", precision: "fp32" },
  { name: "bf16", precision: "bf16" },
];

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

const step = (v: Variant) =>
  withKernelSettings({ precision: v.precision }, () => trainStep(fixture, parts, optimisers.get(v.name)!));
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[xs.length >> 1]!;

const times = new Map<string, number[]>(variants.map((v) => [v.name, []]));
const peaks = new Map<string, number>();
for (const v of variants) {
  await step(v); // warm-up: oneDNN primitives, V8 tiers
  peaks.set(v.name, (await tf.profile(() => step(v))).peakBytes);
}
for (let r = 0; r < rounds; r++) {
  for (const v of variants) {
    const t: number[] = [];
    for (let i = 0; i < reps; i++) {
      const t0 = performance.now();
      await step(v);
      t.push(performance.now() - t0);
    }
    times.get(v.name)!.push(median(t));
  }
}
console.log(
  `threads ${o.threads}, ${rounds} rounds x ${reps} steps; load ${Deno.loadavg().map((x) => x.toFixed(1))}`,
);
console.log(`| precision          | step ms (per round)      | median | vs fp32 | peak tensor MB |`);
console.log(`| ------------------ | ------------------------ | -----: | ------: | -------------: |`);
const base = median(times.get("fp32")!);
for (const v of variants) {
  const t = times.get(v.name)!;
  console.log(
    `| ${v.name.padEnd(18)} | ${t.map((x) => x.toFixed(0)).join(", ").padEnd(24)} | ${
      median(t).toFixed(0).padStart(6)
    } | ${(median(t) / base).toFixed(2).padStart(6)}x | ${
      (peaks.get(v.name)! / 1e6).toFixed(0).padStart(14)
    } |`,
  );
}
for (const opt of optimisers.values()) opt.dispose();
fixture.dispose();
await runtime.dispose();
