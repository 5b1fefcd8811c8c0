/**
 * bf16 against fp32 filter gradients on bf16 activations (the bf16 trunk's convolutions,
 * backend/onednn_bf16_conv.ts), per convolution of a ResNet's trunk: the fp32 side includes its two
 * copies of x and dy to fp32. The data for `bf16FilterGradientPays`, the rule that picks one per shape.
 *
 *   deno run -A bench/filter_gradient_bench.ts [--threads 2] [--reps 10] [--arch resnet18]
 *                                              [--widths 16,32,64] [--rows 128] [--sides 32,16]
 *
 * `--rows` images of each side in `--sides` (a multi-crop step's resolution groups). Per shape, the
 * two variants alternate call by call; prints the median ms of each and what the rule picks.
 */
import { Effect } from "effect";
import { bf16FilterGradientPays, bf16Tuning, type DnnlConvShape, loadDnnl } from "../backend/onednn.ts";
import { installKernelSettings, makeKernelSettings } from "../backend/kernel_settings.ts";
import { backbonePlan, blocksProgram, type ResnetArch } from "../models/resnet.ts";
import { setDnnlThreads } from "../backend/onednn.ts";

const flag = (name: string, fallback: string) => {
  const i = Deno.args.indexOf(name);
  return i >= 0 && i + 1 < Deno.args.length ? Deno.args[i + 1]! : fallback;
};
const threads = Number(flag("--threads", "2"));
const reps = Number(flag("--reps", "10"));
const arch = flag("--arch", "resnet18") as ResnetArch;
const widths = flag("--widths", "16,32,64").split(",").map(Number);
const rows = Number(flag("--rows", "128"));
const sides = flag("--sides", "32,16").split(",").map(Number);

const dnnl = loadDnnl();
if (dnnl === undefined) {
  console.error("oneDNN is not loaded (apt-get install libdnnl2)");
  Deno.exit(1);
}
installKernelSettings(Effect.runSync(makeKernelSettings({ threads, precision: "bf16" })));
setDnnlThreads(threads);

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
const label = (g: DnnlConvShape) =>
  `${g.kh}x${g.kw}/${g.sh} ${g.ci}->${g.co} on ${g.h}x${g.w} -> ${g.oh}x${g.ow}, n ${g.n}`;

console.log(`oneDNN ${dnnl.library}, ${threads} threads, ${reps} calls per variant, median ms`);
console.log("| width | convolution | fp32 (with copies) | bf16 | bf16 / fp32 | rule picks |");
console.log("| ----: | ----------- | -----------------: | ---: | ----------: | ---------- |");
for (const width of widths) {
  const plan = backbonePlan({ arch, width, inputChannels: 3, stem: "cifar" });
  const seen = new Set<string>();
  for (const side of sides) {
    for (const node of blocksProgram(plan, [rows, side, side, 3], true).program.nodes) {
      if (node.kind !== "convolution") continue;
      const g = node.shape;
      if (seen.has(label(g)) || !dnnl.bf16Conv.supports(g)) continue;
      seen.add(label(g));
      const x = new Uint8Array(2 * g.n * g.h * g.w * g.ci).fill(0x3f);
      const dy = new Uint8Array(2 * g.n * g.oh * g.ow * g.co).fill(0x3c);
      const dw = new Float32Array(g.kh * g.kw * g.ci * g.co);
      const times: Record<"fp32" | "bf16", number[]> = { fp32: [], bf16: [] };
      // The fp32 side's copies of x and dy, allocated once (the trunk reuses freed heap memory).
      bf16Tuning.filterGradient = "fp32";
      const fp32Scratch = new Uint8Array(dnnl.bf16Conv.scratchBytes(g));
      for (let i = 0; i < reps + 2; i++) {
        for (const variant of ["fp32", "bf16"] as const) {
          bf16Tuning.filterGradient = variant;
          const scratch = variant === "fp32" ? fp32Scratch : undefined;
          const t0 = performance.now();
          dnnl.bf16Conv.backwardWeights(
            g,
            Deno.UnsafePointer.of(x),
            Deno.UnsafePointer.of(dy),
            Deno.UnsafePointer.of(dw),
            scratch === undefined ? undefined : Deno.UnsafePointer.of(scratch),
          );
          if (i >= 2) times[variant].push(performance.now() - t0);
        }
      }
      bf16Tuning.filterGradient = "rule";
      const [f, b] = [median(times.fp32), median(times.bf16)];
      console.log(
        `| ${width} | ${label(g)} | ${f.toFixed(2)} | ${b.toFixed(2)} | ${(b / f).toFixed(2)} | ${
          bf16FilterGradientPays(g) ? "bf16" : "fp32"
        } |`,
      );
    }
  }
}
