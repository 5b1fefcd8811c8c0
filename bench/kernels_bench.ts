/**
 * wasm training-step kernels, before and after, measured in one run:
 *
 *   1. Conv2DBackpropInput: tfjs-backend-wasm's own kernel vs the polyphase
 *      XNNPACK convolution (backend/wasm_kernels.ts), on the ResNet-18 shapes;
 *   2. BatchNorm forward + backward: tf.moments + tf.batchNorm vs batchNormTrain;
 *   3. one SwAV forward + backward (ResNet-18 width 8, cifar stem, batch 64,
 *      2x32x32 crops, hidden 512, 100 prototypes), three variants, with a
 *      tf.profile kernel table for the first and the last.
 *
 *   npx deno run -A bench/kernels_bench.ts [--reps 5] [--step-reps 3]
 *
 * Times are medians; the machine is shared, so compare ratios within one run.
 */
import * as tf from "@tensorflow/tfjs";
import { batchNormTrain } from "../backend/batch_norm.ts";
import { initBackend, withKernelSettings } from "../backend/tensor_backend.ts";
import { linear } from "../models/head.ts";
import { l2NormaliseRows } from "../models/prototypes.ts";
import {
  disposeModel,
  makeSwavModel,
  type ModelConfig,
  modelForward,
  type SwavModel,
} from "../models/model.ts";
import {
  type BackbonePlan,
  type BlockPlan,
  BN_EPS,
  BN_MOMENTUM,
  type ForwardOptions,
  type ParamLookup,
} from "../models/resnet.ts";
import { swappedPredictionLoss } from "../stages/swapped_loss.ts";

const argValue = (name: string, fallback: number): number => {
  const i = Deno.args.indexOf(name);
  return i >= 0 ? Number(Deno.args[i + 1]) : fallback;
};
const REPS = argValue("--reps", 7);
const STEP_REPS = argValue("--step-reps", 3);

const median = (xs: number[]): number => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[s.length >> 1]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
};

/** Median wall time of `f` (synchronous wasm kernels; the result is read to be sure it ran). */
const timeIt = async (f: () => tf.Tensor | tf.Tensor[], reps = REPS): Promise<number> => {
  const times: number[] = [];
  for (let i = 0; i <= reps; i++) {
    const t0 = performance.now();
    const out = f();
    const list = Array.isArray(out) ? out : [out];
    await list[0]!.data();
    const dt = performance.now() - t0;
    tf.dispose(list);
    if (i > 0) times.push(dt); // the first run warms caches and allocations
  }
  return median(times);
};

const row = (label: string, before: number, after: number) =>
  console.log(
    `| ${label.padEnd(44)} | ${before.toFixed(2).padStart(9)} | ${after.toFixed(2).padStart(9)} | ${
      (before / after).toFixed(2).padStart(6)
    }x |`,
  );
const header = (title: string) => {
  console.log(`\n${title}\n`);
  console.log(`| ${"case".padEnd(44)} | before ms |  after ms |   ratio |`);
  console.log(`| ${"-".repeat(44)} | --------: | --------: | ------: |`);
};

await initBackend("wasm");
console.log(`tfjs ${tf.version.tfjs}, backend ${tf.getBackend()}, reps ${REPS}, step reps ${STEP_REPS}`);

// 1. Conv2DBackpropInput on the ResNet-18 (width 8, cifar stem, batch 128 = 2 crops x 64) shapes.
header("Conv2DBackpropInput (tfjs-backend-wasm loop -> polyphase XNNPACK conv)");
const convCases: {
  label: string;
  x: [number, number, number, number];
  k: number;
  cout: number;
  stride: number;
  pad: number;
}[] = [
  { label: "3x3/1 32x32 8->8", x: [128, 32, 32, 8], k: 3, cout: 8, stride: 1, pad: 1 },
  { label: "3x3/2 32x32 8->16", x: [128, 32, 32, 8], k: 3, cout: 16, stride: 2, pad: 1 },
  { label: "1x1/2 32x32 8->16 (downsample)", x: [128, 32, 32, 8], k: 1, cout: 16, stride: 2, pad: 0 },
  { label: "3x3/1 16x16 16->16", x: [128, 16, 16, 16], k: 3, cout: 16, stride: 1, pad: 1 },
  { label: "3x3/1 8x8 32->32", x: [128, 8, 8, 32], k: 3, cout: 32, stride: 1, pad: 1 },
  { label: "3x3/1 4x4 64->64", x: [128, 4, 4, 64], k: 3, cout: 64, stride: 1, pad: 1 },
  { label: "7x7/2 64x64 3->16 (imagenet stem)", x: [32, 64, 64, 3], k: 7, cout: 16, stride: 2, pad: 3 },
];
for (const c of convCases) {
  const w = tf.randomNormal([c.k, c.k, c.x[3]!, c.cout]) as tf.Tensor4D;
  const pad = [[0, 0], [c.pad, c.pad], [c.pad, c.pad], [0, 0]] as [
    [number, number],
    [number, number],
    [number, number],
    [number, number],
  ];
  const outShape = tf.backend_util.computeConv2DInfo(c.x, w.shape, c.stride, 1, pad).outShape;
  const dy = tf.randomNormal(outShape) as tf.Tensor4D;
  const run = () => tf.conv2dTranspose(dy, w, c.x, c.stride, pad);
  const before = await withKernelSettings({ fastConv2DBackpropInput: false }, () => timeIt(run));
  const after = await timeIt(run);
  row(c.label, before, after);
  tf.dispose([w, dy]);
}

// 2. BatchNorm forward + backward.
header("BatchNorm train forward + backward (tf.moments + tf.batchNorm -> batchNormTrain)");
const tfjsBatchNorm = (x: tf.Tensor, gamma: tf.Tensor1D, beta: tf.Tensor1D) => {
  const axes = x.shape.slice(0, -1).map((_, i) => i);
  const { mean, variance } = tf.moments(x, axes);
  return tf.batchNorm(x, mean as tf.Tensor1D, variance as tf.Tensor1D, beta, gamma, BN_EPS);
};
for (const shape of [[128, 32, 32, 8], [128, 16, 16, 16], [128, 8, 8, 32], [128, 4, 4, 64], [128, 512]]) {
  const x = tf.randomNormal(shape);
  const r = tf.randomNormal(shape);
  const c = shape[shape.length - 1]!;
  const gamma = tf.randomNormal([c]) as tf.Tensor1D;
  const beta = tf.randomNormal([c]) as tf.Tensor1D;
  const step = (norm: (x: tf.Tensor, g: tf.Tensor1D, b: tf.Tensor1D) => tf.Tensor) => () =>
    tf.tidy(() =>
      tf.grads((xi, gi, bi) => tf.sum(tf.mul(norm(xi!, gi as tf.Tensor1D, bi as tf.Tensor1D), r)))([
        x,
        gamma,
        beta,
      ])
    );
  const before = await timeIt(step(tfjsBatchNorm));
  const after = await timeIt(step((xi, gi, bi) => batchNormTrain(xi, gi, bi, BN_EPS).y));
  row(`[${shape}]`, before, after);
  tf.dispose([x, r, gamma, beta]);
}

// 3. The whole step. The "after" forward is a local copy of models/resnet.ts's
// backbone and models/head.ts's head with batchNorm routed to batchNormTrain.
const updateRunningStats = (
  params: ParamLookup,
  name: string,
  mean: tf.Tensor,
  variance: tf.Tensor,
  count: number,
) => {
  const runningMean = params(`${name}.running_mean`) as tf.Variable;
  const runningVar = params(`${name}.running_var`) as tf.Variable;
  const [newMean, newVar] = tf.tidy(() => [
    tf.add(tf.mul(runningMean, 1 - BN_MOMENTUM), tf.mul(mean, BN_MOMENTUM)),
    tf.add(tf.mul(runningVar, 1 - BN_MOMENTUM), tf.mul(variance, (BN_MOMENTUM * count) / (count - 1))),
  ]);
  runningMean.assign(newMean!);
  runningVar.assign(newVar!);
  tf.dispose([newMean!, newVar!]);
};
/** The proposed models/resnet.ts batchNorm train branch. */
const fastBatchNorm = <T extends tf.Tensor>(
  params: ParamLookup,
  name: string,
  x: T,
  options: ForwardOptions,
): T => {
  const count = x.size / x.shape[x.rank - 1]!;
  const { y, mean, variance } = batchNormTrain(
    x,
    params(`${name}.weight`) as tf.Tensor1D,
    params(`${name}.bias`) as tf.Tensor1D,
    BN_EPS,
  );
  if (options.updateRunningStats ?? true) updateRunningStats(params, name, mean, variance, count);
  return y;
};
const conv = (params: ParamLookup, name: string, x: tf.Tensor4D, stride: number, pad: number): tf.Tensor4D =>
  tf.conv2d(x, params(name) as tf.Tensor4D, stride, [[0, 0], [pad, pad], [pad, pad], [0, 0]]);
const basicBlock = (
  params: ParamLookup,
  b: BlockPlan,
  x: tf.Tensor4D,
  options: ForwardOptions,
): tf.Tensor4D => {
  const p = b.prefix;
  let y = tf.relu(
    fastBatchNorm(params, `${p}.bn1`, conv(params, `${p}.conv1.weight`, x, b.stride, 1), options),
  );
  y = fastBatchNorm(params, `${p}.bn2`, conv(params, `${p}.conv2.weight`, y, 1, 1), options);
  const shortcut = b.downsample
    ? fastBatchNorm(
      params,
      `${p}.downsample.1`,
      conv(params, `${p}.downsample.0.weight`, x, b.stride, 0),
      options,
    )
    : x;
  return tf.relu(tf.add(y, shortcut));
};
const fastForward = (model: SwavModel, group: tf.Tensor4D, options: ForwardOptions) =>
  tf.tidy(() => {
    const plan: BackbonePlan = model.plan;
    const params: ParamLookup = model.param;
    let y = conv(params, "backbone.conv1.weight", group, plan.stemStride, plan.stemPad);
    y = tf.relu(fastBatchNorm(params, "backbone.bn1", y, options));
    for (const b of plan.blocks) y = basicBlock(params, b, y, options);
    const features = tf.mean(y, [1, 2]) as tf.Tensor2D;
    const hidden = linear(params, "projection_head.0", features);
    const activated = tf.relu(fastBatchNorm(params, "projection_head.1", hidden, options));
    const embeddings = l2NormaliseRows(linear(params, "projection_head.3", activated));
    return { scores: linear(params, "prototypes", embeddings, false) };
  });

const config: ModelConfig = {
  arch: "resnet18",
  width: 8,
  inputChannels: 3,
  stem: "cifar",
  hidden: 512,
  out: 128,
  prototypes: 100,
  syncBatchNorm: true,
};
const model = makeSwavModel(config, 1);
const batch = 64;
const crops = tf.randomNormal([2 * batch, 32, 32, 3]) as tf.Tensor4D;
const lossOptions = {
  batchSize: batch,
  nmbCrops: [2],
  cropsForAssign: [0, 1],
  temperature: 0.1,
  epsilon: 0.05,
  iterations: 3,
};
const trainable = model.params.filter((p) => p.trainable).map((p) => p.variable);
const stepWith = (forward: "library" | "fast") => () => {
  const { value, grads } = tf.variableGrads(() => {
    const scores = forward === "library"
      ? modelForward(model, [crops], { training: true }).scores!
      : fastForward(model, crops, { training: true }).scores;
    return swappedPredictionLoss(scores, lossOptions);
  }, trainable);
  return [value, ...Object.values(grads)];
};

const variants = [
  { label: "before: wasm Conv2DBackpropInput, tf.batchNorm", fast: false, forward: "library" as const },
  { label: "fast Conv2DBackpropInput, tf.batchNorm", fast: true, forward: "library" as const },
  { label: "fast Conv2DBackpropInput + batchNormTrain", fast: true, forward: "fast" as const },
];
const stepTimes: number[] = [];
for (const v of variants) {
  stepTimes.push(
    await withKernelSettings(
      { fastConv2DBackpropInput: v.fast },
      () => timeIt(stepWith(v.forward), STEP_REPS),
    ),
  );
}
header("Forward + backward step, ResNet-18 w8 cifar, batch 64, 2x32x32, hidden 512, 100 prototypes");
for (let i = 1; i < variants.length; i++) row(variants[i]!.label, stepTimes[0]!, stepTimes[i]!);
console.log(`(before = ${variants[0]!.label})`);

/** Kernel time by kernel name over one profiled step. */
const profileStep = async (v: (typeof variants)[number]) => {
  const info = await withKernelSettings(
    { fastConv2DBackpropInput: v.fast },
    () => tf.profile(() => stepWith(v.forward)()),
  );
  const byName = new Map<string, { ms: number; calls: number }>();
  for (const k of info.kernels) {
    const entry = byName.get(k.name) ?? { ms: 0, calls: 0 };
    entry.ms += typeof k.kernelTimeMs === "number" ? k.kernelTimeMs : 0;
    entry.calls++;
    byName.set(k.name, entry);
  }
  tf.dispose(info.result as tf.Tensor[]);
  return byName;
};
const before = await profileStep(variants[0]!);
const after = await profileStep(variants[variants.length - 1]!);
const total = (m: Map<string, { ms: number }>) => [...m.values()].reduce((s, e) => s + e.ms, 0);
console.log(`\nKernel time in one profiled step (tf.profile kernelTimeMs), before -> after\n`);
console.log(`| ${"kernel".padEnd(22)} | before ms (calls) | after ms (calls) |`);
console.log(`| ${"-".repeat(22)} | ----------------: | ---------------: |`);
const names = [...new Set([...before.keys(), ...after.keys()])].sort((a, b) =>
  (before.get(b)?.ms ?? 0) - (before.get(a)?.ms ?? 0)
);
for (const name of names.slice(0, 20)) {
  const b = before.get(name);
  const a = after.get(name);
  const cell = (e?: { ms: number; calls: number }) =>
    (e ? `${e.ms.toFixed(1)} (${e.calls})` : "-").padStart(17);
  console.log(`| ${name.padEnd(22)} | ${cell(b)} | ${cell(a).padStart(16)} |`);
}
console.log(
  `| ${"total".padEnd(22)} | ${total(before).toFixed(1).padStart(17)} | ${
    total(after).toFixed(1).padStart(16)
  } |`,
);

crops.dispose();
disposeModel(model);
