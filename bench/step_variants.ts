/**
 * Before/after of each training-step optimisation, in one process, variants
 * alternated round by round (timings on a shared machine drift; alternating
 * keeps the comparison fair). The benchmark configuration of bench/bench.ts.
 *
 *   deno run -A bench/step_variants.ts [--threads N] [--rounds 3] [--reps 3] [bench.ts model flags]
 *
 * Variants: the current step, then the current step with one optimisation
 * turned back off, then all of them off:
 *   conv weights plain  oneDNN convolutions on TF.js's HWIO weights (im2col + gemm)
 *   batch norm ops      training batch norm as wasm tensor ops (closed-form backward)
 *   element-wise wasm   residual relu(y + shortcut), its gradient and large sums on wasm's own kernels
 *   LARC ops            LARC-SGD as ~15 tensor ops per parameter
 *   variableGrads       TF.js's own backward (keeps every gradient to the end)
 * Prints per variant the median step ms over rounds (each round the median of
 * --reps steps) and the peak tensor bytes of one step (tf.profile).
 */
import * as tf from "@tensorflow/tfjs";
import { Effect, ManagedRuntime } from "effect";
import { TensorBackend, withKernelSettings } from "../backend/tensor_backend.ts";
import { swavTape } from "../pipelines/swav_step.ts";
import { LarcSgd } from "../stages/optimise.ts";
import { makeFixture, parseBenchArgs, trainStep } from "./bench.ts";

interface Variant {
  readonly name: string;
  readonly weightsLayout: "any" | "plain";
  readonly nativeBatchNorm: boolean;
  readonly nativeElementwise: boolean;
  readonly fusedLarc: boolean;
  readonly leanBackward: boolean;
}
const current: Variant = {
  name: "current",
  weightsLayout: "any",
  nativeBatchNorm: true,
  nativeElementwise: true,
  fusedLarc: true,
  leanBackward: true,
};
const variants: Variant[] = [
  current,
  { ...current, name: "conv weights plain", weightsLayout: "plain" },
  { ...current, name: "batch norm ops", nativeBatchNorm: false },
  { ...current, name: "element-wise wasm", nativeElementwise: false },
  { ...current, name: "LARC ops", fusedLarc: false },
  { ...current, name: "variableGrads", leanBackward: false },
  {
    name: "all five off",
    weightsLayout: "plain",
    nativeBatchNorm: false,
    nativeElementwise: false,
    fusedLarc: false,
    leanBackward: false,
  },
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
// The backend and the run's kernel settings; each variant changes its fields on top of them (`step`).
const runSettings = { threads: o.threads, blas: o.blas };
const runtime = ManagedRuntime.make(TensorBackend.layer("wasm", runSettings));
await runtime.runPromise(Effect.service(TensorBackend));

const fixture = makeFixture(o);
const parts = swavTape(fixture.model, fixture.config, o.batch);
// One optimiser per variant (its own momentum slots), fused or not.
const optimisers = new Map(
  variants.map((v) => [v.name, new LarcSgd(fixture.optimiser.options, v.fusedLarc)]),
);

const step = (v: Variant) =>
  withKernelSettings(
    {
      dnnlWeightsLayout: v.weightsLayout,
      nativeBatchNorm: v.nativeBatchNorm,
      nativeElementwise: v.nativeElementwise,
      leanBackward: v.leanBackward,
    },
    () => trainStep(fixture, parts, optimisers.get(v.name)!),
  );
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
console.log(`| variant            | step ms (per round)      | median | vs current | peak tensor MB |`);
console.log(`| ------------------ | ------------------------ | -----: | ---------: | -------------: |`);
const base = median(times.get("current")!);
for (const v of variants) {
  const t = times.get(v.name)!;
  console.log(
    `| ${v.name.padEnd(18)} | ${t.map((x) => x.toFixed(0)).join(", ").padEnd(24)} | ${
      median(t).toFixed(0).padStart(6)
    } | ${(median(t) / base).toFixed(2).padStart(9)}x | ${
      (peaks.get(v.name)! / 1e6).toFixed(0).padStart(14)
    } |`,
  );
}
for (const opt of optimisers.values()) opt.dispose();
fixture.dispose();
await runtime.dispose();
