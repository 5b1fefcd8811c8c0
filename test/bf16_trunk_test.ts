/**
 * The bf16 trunk (backend/bf16_trunk.ts): a ResNet's residual blocks as one op on bf16 activations,
 * against the same blocks layer by layer in fp32 and in bf16 with fp32 storage between layers.
 *
 * Tolerance. The layer-by-layer bf16 path rounds each convolution's inputs (x, w; dy, w; x, dy) to
 * bf16 (relative 2^-9 each). The trunk rounds those and, in addition, every convolution's output,
 * every batch norm's output, every sum and every gradient between layers: about twice as many
 * roundings on the way from the input to the output and back. Independent roundings add up in
 * quadrature, so its change from fp32 should be about √2 times the layer-by-layer path's; the
 * tests allow 4 times (over 20 runs the largest change was 0.91 of a 3-times bound), plus 2^-6 for values the layer-by-layer path happens to leave exact (a batch
 * norm's shift gradient is Σ dy, and dy stays fp32 there where the trunk rounds it: relative 2^-9
 * per value, seen up to 2^-7.8 on a sum that cancels), and check that bf16 really ran (changes
 * above 2^-14; fp32's own rounding is about 2^-23). A wrong gradient (a misplaced buffer, a missing
 * sum) changes its values by the order of their size, far above these bounds.
 *
 * Scale. At initialisation the gradient of Σ y·r for random r through batch norms and ReLUs is
 * sensitive: the layer-by-layer bf16 path already changes it by 3-7 % through one block (ReLU masks
 * that flip, batch norm's projections that cancel) and by 20-50 % through a whole ResNet-18, so the
 * one-block tests are the ones that pin the trunk's gradients; the whole-network tests pin its
 * output and running statistics (changes 2^-5 and 2^-13 there) and catch gross gradient errors.
 */
import * as tf from "@tensorflow/tfjs";
import assert from "node:assert/strict";
import { bf16TrunkSupports } from "../backend/bf16_trunk.ts";
import { withKernelSettings } from "../backend/tensor_backend.ts";
import {
  backboneFeatureMap,
  backboneParamSpecs,
  type BackbonePlan,
  backbonePlan,
  blocksProgram,
  residualBlocks,
  type ResnetArch,
} from "../models/resnet.ts";
import { relativeError, useBackend } from "./_helpers.ts";
import { bf16Test } from "./_optional.ts";

/** Random parameters of `plan` as variables (BatchNorm's scales near 1, shifts near 0). */
const randomParams = (plan: BackbonePlan, seed: number): Map<string, tf.Variable> =>
  new Map(
    backboneParamSpecs(plan).map((spec, i) => {
      const s = seed + i;
      const init = spec.init;
      const value = init.kind === "kaimingNormalFanOut"
        ? tf.randomNormal(spec.shape as number[], 0, Math.sqrt(2 / init.fanOut), "float32", s)
        : spec.name.endsWith(".weight")
        ? tf.add(1, tf.randomNormal(spec.shape as number[], 0, 0.2, "float32", s))
        : spec.name.endsWith(".bias")
        ? tf.randomNormal(spec.shape as number[], 0, 0.2, "float32", s)
        : spec.name.endsWith("running_var")
        ? tf.ones(spec.shape as number[])
        : tf.zeros(spec.shape as number[]);
      return [spec.name, tf.variable(value as tf.Tensor, spec.trainable)];
    }),
  );

interface Pass {
  readonly y: Float64Array;
  /** Gradients of Σ y·r by parameter name, and the running statistics after the forward. */
  readonly grads: ReadonlyMap<string, Float64Array>;
  readonly running: ReadonlyMap<string, Float64Array>;
}

/** The backbone's train-mode forward and backward on `x` under the given settings (parameters reset first). */
const pass = async (
  plan: BackbonePlan,
  seed: number,
  x: tf.Tensor4D,
  r: tf.Tensor,
  settings: { precision: "fp32" | "bf16"; bf16Trunk: boolean },
): Promise<Pass> => {
  const params = randomParams(plan, seed);
  try {
    return await withKernelSettings(settings, () => {
      const trainable = [...params.entries()].filter(([, v]) => v.trainable);
      const { value, grads } = tf.variableGrads(
        () =>
          tf.sum(tf.mul(
            backboneFeatureMap(
              plan,
              (name) => params.get(name)!,
              x,
              { training: true },
            ),
            r,
          )) as tf.Scalar,
        trainable.map(([, v]) => v),
      );
      const y = tf.tidy(() =>
        backboneFeatureMap(plan, (name) => params.get(name)!, x, {
          training: true,
          updateRunningStats: false,
        })
      );
      const result: Pass = {
        y: Float64Array.from(y.dataSync()),
        grads: new Map(trainable.map(([name, v]) => [name, Float64Array.from(grads[v.name]!.dataSync())])),
        running: new Map(
          [...params.entries()].filter(([name]) => name.includes("running")).map((
            [name, v],
          ) => [name, Float64Array.from(v.dataSync())]),
        ),
      };
      tf.dispose([value, y, ...Object.values(grads)]);
      return Promise.resolve(result);
    });
  } finally {
    params.forEach((v) => v.dispose());
  }
};

/** One block's output, and the gradients of Σ y·r for its input and every parameter, under `settings`. */
const blockPass = async (
  plan: BackbonePlan,
  seed: number,
  x: tf.Tensor4D,
  r: tf.Tensor,
  settings: { precision: "fp32" | "bf16"; bf16Trunk: boolean },
) => {
  const params = randomParams(plan, seed);
  const names = [
    ...new Set(plan.blocks.flatMap((b) => blocksProgram({ ...plan, blocks: [b] }, x.shape).params)),
  ];
  try {
    return await withKernelSettings(settings, () => {
      const f = (input: tf.Tensor, ...weights: tf.Tensor[]) => {
        const lookup = (name: string) => {
          const i = names.indexOf(name);
          return i >= 0 ? weights[i]! : params.get(name)!;
        };
        return tf.sum(tf.mul(residualBlocks(plan, lookup, input as tf.Tensor4D, { training: true }), r));
      };
      const y = tf.tidy(() =>
        residualBlocks(plan, (name) => params.get(name)!, x, { training: true, updateRunningStats: false })
      );
      const grads = tf.grads(f)([x, ...names.map((name) => params.get(name)!)]);
      const result = {
        y: Float64Array.from(y.dataSync()),
        grads: new Map(["input", ...names].map((name, i) => [name, Float64Array.from(grads[i]!.dataSync())])),
      };
      tf.dispose([y, ...grads]);
      return Promise.resolve(result);
    });
  } finally {
    params.forEach((v) => v.dispose());
  }
};

/**
 * The trunk's change from fp32 (`ref`) within 4 times the layer-by-layer bf16 path's (`yardstick`) plus
 * 2^-6; returns the change.
 */
const checkNear = (label: string, got: Float64Array, yardstick: Float64Array, ref: Float64Array): number => {
  const change = relativeError(got, ref);
  const bound = 4 * relativeError(yardstick, ref) + 2 ** -6;
  assert.ok(change <= bound, `${label}: the trunk changes it by ${change}, above ${bound}`);
  return change;
};

const pick = (lo: number, hi: number) => lo + Math.floor(Math.random() * (hi - lo + 1));

for (const arch of ["resnet18", "resnet50"] as const satisfies readonly ResnetArch[]) {
  bf16Test(`bf16 trunk, ${arch}: output, every gradient and the running statistics near fp32's`, async () => {
    await useBackend("wasm");
    const plan = backbonePlan({ arch, width: 16, inputChannels: 3, stem: "cifar" });
    const [n, side] = [pick(2, 4), 8 * pick(2, 3)];
    const seed = pick(0, 1e6);
    const x = tf.randomNormal([n, side, side, 3], 0, 1, "float32", seed) as tf.Tensor4D;
    const r = tf.randomNormal([n, side / 8, side / 8, plan.featureDim], 0, 1, "float32", seed + 1);
    try {
      assert.ok(
        bf16TrunkSupports(blocksProgram(plan, [n, side, side, 16]).program),
        "oneDNN takes the trunk",
      );
      const fp32 = await pass(plan, seed + 2, x, r, { precision: "fp32", bf16Trunk: false });
      const layered = await pass(plan, seed + 2, x, r, { precision: "bf16", bf16Trunk: false });
      const trunk = await pass(plan, seed + 2, x, r, { precision: "bf16", bf16Trunk: true });
      const yChange = checkNear("output", trunk.y, layered.y, fp32.y);
      assert.ok(yChange > 2 ** -14, `output equal to fp32's (${yChange}): the trunk did not run`);
      assert.ok(relativeError(trunk.y, layered.y) > 0, "output equal to the layer-by-layer bf16 path's");
      for (const [name, g] of fp32.grads) {
        checkNear(`${name} gradient`, trunk.grads.get(name)!, layered.grads.get(name)!, g);
      }
      for (const [name, v] of fp32.running) {
        checkNear(name, trunk.running.get(name)!, layered.running.get(name)!, v);
      }
    } finally {
      tf.dispose([x, r]);
    }
  });
}

bf16Test("bf16 trunk: shapes oneDNN must not be given keep the layer-by-layer path", async () => {
  await useBackend("wasm");
  // Width 8: strided 1x1 filter gradients on 8, 16 and 32 channels (overrunsScratchpad).
  const plan = backbonePlan({ arch: "resnet18", width: 8, inputChannels: 3, stem: "cifar" });
  assert.equal(bf16TrunkSupports(blocksProgram(plan, [2, 16, 16, 8]).program), false);
  await Promise.resolve();
});

for (
  const [arch, index, label] of [
    ["resnet18", 0, "basic block"],
    ["resnet18", 2, "basic block with a strided downsample"],
    ["resnet50", 0, "bottleneck block with a downsample"],
    ["resnet50", 3, "bottleneck block with a strided downsample"],
  ] as const
) {
  bf16Test(`bf16 trunk, one ${label}: output and gradients near fp32's`, async () => {
    await useBackend("wasm");
    const full = backbonePlan({ arch, width: 16, inputChannels: 3, stem: "cifar" });
    const b = full.blocks[index]!;
    const plan = { ...full, blocks: [b] };
    const [n, side] = [pick(4, 8), 8 * pick(2, 3)];
    const seed = pick(0, 1e6);
    const x = tf.randomNormal([n, side, side, b.inChannels], 0, 1, "float32", seed) as tf.Tensor4D;
    const out = side / b.stride;
    const r = tf.randomNormal([n, out, out, b.outChannels], 0, 1, "float32", seed + 1);
    try {
      const fp32 = await blockPass(plan, seed + 2, x, r, { precision: "fp32", bf16Trunk: false });
      const trunk = await blockPass(plan, seed + 2, x, r, { precision: "bf16", bf16Trunk: true });
      const layered = await blockPass(plan, seed + 2, x, r, { precision: "bf16", bf16Trunk: false });
      const output = checkNear("output", trunk.y, layered.y, fp32.y);
      assert.ok(output > 2 ** -14, `output equal to fp32's (${output}): bf16 did not run`);
      for (const [name, g] of fp32.grads) {
        checkNear(`${name} gradient`, trunk.grads.get(name)!, layered.grads.get(name)!, g);
      }
    } finally {
      tf.dispose([x, r]);
    }
  });
}

bf16Test("bf16 trunk: repeated steps keep the live tensors and the heap buffers flat", async () => {
  await useBackend("wasm");
  const backend = tf.backend();
  // Heap buffers that are no tensor's: the backward's gradient buffers and scratch, freed as it walks.
  const extra = () => backend.numDataIds() - tf.memory().numDataBuffers;
  const plan = backbonePlan({ arch: "resnet18", width: 16, inputChannels: 3, stem: "cifar" });
  const params = randomParams(plan, pick(0, 1e6));
  const x = tf.randomNormal([4, 16, 16, 3]) as tf.Tensor4D;
  const trainable = [...params.values()].filter((v) => v.trainable);
  const counts: number[] = [];
  const extras: number[] = [];
  try {
    for (let i = 0; i < 4; i++) {
      await withKernelSettings({ precision: "bf16", bf16Trunk: true }, () => {
        const { value, grads } = tf.variableGrads(
          () =>
            tf.sum(tf.square(backboneFeatureMap(plan, (name) => params.get(name)!, x, { training: true }))),
          trainable,
        );
        tf.dispose([value, ...Object.values(grads)]);
        return Promise.resolve();
      });
      counts.push(tf.memory().numTensors);
      extras.push(extra());
    }
    assert.equal(new Set(counts).size, 1, `live tensors after each step: ${counts}`);
    assert.ok(
      extras.every((k) => k === extras[0]),
      `heap buffers beyond the tensors after each step: ${extras}`,
    );
  } finally {
    params.forEach((v) => v.dispose());
    x.dispose();
  }
});
