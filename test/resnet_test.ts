/**
 * ResNet backbone, projection head and prototypes against torch float64
 * (reference/resnet_reference.py -> test/fixtures/resnet.json): forward in train
 * and eval mode, BatchNorm running statistics, gradients through the batch
 * statistics; plus parameter layout, initialisation and leak checks.
 *
 * Tolerances (float32 against float64): norm-wise relative error < 1e-4 on
 * embeddings, scores, features and running statistics; < 1e-3 on gradients.
 * Where torch's own float32 forward is already further than 1e-4/4 from float64
 * (the bottleneck ResNet-50 at width 4: ~5e-5, from its deep stack of BatchNorms
 * over 4–16 channels), the bounds become 4x torch's float32 error and 10x that
 * for gradients; the fixture records that error for each case.
 */
import * as tf from "@tensorflow/tfjs";
import { leanVariableGrads } from "../backend/lean_gradients.ts";
import assert from "node:assert/strict";
import { Effect, Exit } from "effect";
import { initBackend } from "../backend/tensor_backend.ts";
import {
  decodeModelConfig,
  disposeModel,
  estimateMemory,
  groupCropsByResolution,
  initialValues,
  loadModelArrays,
  makeSwavModel,
  type ModelConfig,
  modelForward,
  modelParamSpecs,
  ModelWeightsError,
  readModelArrays,
  type SwavModel,
  trainableVariables,
} from "../models/model.ts";
import { backboneParamSpecs, backbonePlan } from "../models/resnet.ts";
import { assertNoTensorLeak, relativeError, values } from "./_helpers.ts";

const FORWARD_TOL = 1e-4;
const GRAD_TOL = 1e-3;

/** The tolerances of one case: the stated ones, or 4x (10x) torch's own float32 error if that is larger. */
const tolerances = (c: Case): { forward: number; grad: number } => {
  const torch32 = Math.max(c.torchFloat32Error.embeddings, c.torchFloat32Error.scores);
  return { forward: Math.max(FORWARD_TOL, 4 * torch32), grad: Math.max(GRAD_TOL, 40 * torch32) };
};

interface Case {
  readonly name: string;
  readonly config: ModelConfig;
  readonly batch: number;
  /** Norm-wise relative error of torch's float32 forward against float64 on this case. */
  readonly torchFloat32Error: { readonly embeddings: number; readonly scores: number };
  readonly params: Record<string, string>;
  readonly groups: { readonly shape: [number, number, number, number]; readonly data: string }[];
  readonly R: string;
  readonly train: { embeddings: number[]; scores: number[]; features: number[]; loss: number };
  readonly grads: Record<string, number[]>;
  readonly runningAfter: Record<string, number[]>;
  readonly eval: { embeddings: number[]; scores: number[] };
}

interface Fixture {
  readonly cases: Case[];
  readonly torchvision: Record<string, { name: string; shape: number[] }[]>;
}

const fixture: Fixture = JSON.parse(
  await Deno.readTextFile(new URL("./fixtures/resnet.json", import.meta.url)),
);

/** Little-endian float32 values from base64 (how the fixture stores weights and inputs compactly). */
const float32FromBase64 = (text: string): Float32Array => {
  const bytes = Uint8Array.from(atob(text), (c) => c.charCodeAt(0));
  return new Float32Array(bytes.buffer);
};

const loadCase = (c: Case): SwavModel => {
  const model = makeSwavModel(c.config, 123);
  assert.deepEqual(
    [...model.params.map((p) => p.name)].sort(),
    Object.keys(c.params).sort(),
    `${c.name}: parameter names differ from torch's state_dict`,
  );
  Effect.runSync(loadModelArrays(
    model,
    model.params.map((p) => ({
      name: p.name,
      shape: [...p.variable.shape],
      values: float32FromBase64(c.params[p.name]!),
    })),
    `fixture ${c.name}`,
  ));
  return model;
};

const checkClose = (label: string, got: ArrayLike<number>, want: ArrayLike<number>, tol: number) => {
  const error = relativeError(got, want);
  assert.ok(error < tol, `${label}: relative error ${error.toExponential(2)} >= ${tol}`);
};

/** One train step against a fixture case, then an eval forward; all on the active backend. */
const checkCase = async (c: Case) => {
  const { forward: FORWARD_TOL, grad: GRAD_TOL } = tolerances(c);
  const model = loadCase(c);
  try {
    const groups = c.groups.map((g) => tf.tensor4d(float32FromBase64(g.data), g.shape));
    const r = tf.tensor2d(float32FromBase64(c.R), [
      c.train.scores.length / (c.config.prototypes as number),
      c.config.prototypes as number,
    ]);
    let outputs: tf.Tensor[] = [];
    const { value: loss, grads } = tf.variableGrads(() => {
      const out = modelForward(model, groups, { training: true });
      outputs = [tf.keep(out.embeddings), tf.keep(out.scores!), tf.keep(out.features)];
      return tf.sum(tf.mul(out.scores!, r));
    }, trainableVariables(model));
    const [embeddings, scores, features] = outputs;
    checkClose(`${c.name} train embeddings`, await values(embeddings!), c.train.embeddings, FORWARD_TOL);
    checkClose(`${c.name} train scores`, await values(scores!), c.train.scores, FORWARD_TOL);
    checkClose(`${c.name} train features`, await values(features!), c.train.features, FORWARD_TOL);
    // A sum with cancellations: bound its error by the scores' error times ‖R‖ (Cauchy-Schwarz).
    const lossError = Math.abs((await values(loss))[0]! - c.train.loss);
    const bound = FORWARD_TOL * Math.hypot(...c.train.scores) * Math.hypot(...float32FromBase64(c.R));
    assert.ok(lossError < bound, `${c.name} loss: error ${lossError} >= ${bound}`);
    const byVariable = new Map(model.params.map((p) => [p.variable.name, p.name]));
    const gradByName = new Map(Object.entries(grads).map(([k, g]) => [byVariable.get(k)!, g]));
    // Every trainable parameter gets a gradient (nothing is cut off from the loss).
    assert.equal(gradByName.size, trainableVariables(model).length);
    for (const [name, want] of Object.entries(c.grads)) {
      const got = gradByName.get(name);
      assert.ok(got !== undefined, `${c.name}: no gradient for ${name}`);
      checkClose(`${c.name} grad ${name}`, await values(got), want, GRAD_TOL);
    }
    for (const [name, want] of Object.entries(c.runningAfter)) {
      checkClose(`${c.name} ${name} after the step`, await values(model.param(name)), want, FORWARD_TOL);
    }
    const evalOut = modelForward(model, groups, { training: false });
    checkClose(`${c.name} eval embeddings`, await values(evalOut.embeddings), c.eval.embeddings, FORWARD_TOL);
    checkClose(`${c.name} eval scores`, await values(evalOut.scores!), c.eval.scores, FORWARD_TOL);
    tf.dispose([...groups, r, loss, ...Object.values(grads), ...outputs, ...Object.values(evalOut)]);
  } finally {
    disposeModel(model);
  }
};

Deno.test("parameter layout matches torchvision's resnet18/34/50 state_dict", () => {
  for (const arch of ["resnet18", "resnet34", "resnet50"] as const) {
    const plan = backbonePlan({ arch, width: 64, inputChannels: 3, stem: "imagenet" });
    const ours = backboneParamSpecs(plan).map((s) => ({ name: s.name, shape: [...s.shape] }));
    assert.deepEqual(ours, fixture.torchvision[arch], arch);
    assert.equal(plan.featureDim, arch === "resnet50" ? 2048 : 512);
  }
});

// wasm is the CPU path the toolkit uses; the cpu backend (slower) runs the two small cases as a cross-check.
for (const backend of ["wasm", "cpu"] as const) {
  Deno.test(`${backend}: train and eval forward, running stats and gradients match torch float64`, async (t) => {
    await initBackend(backend);
    for (const c of fixture.cases) {
      if (backend === "cpu" && c.config.arch === "resnet50") continue;
      await t.step(c.name, () => assertNoTensorLeak(c.name, () => checkCase(c)));
    }
  });
}

Deno.test("modelForward: one backbone pass per resolution group, adjacent equal sizes merged; head BatchNorm sees all crops", async () => {
  await initBackend("wasm");
  const c = fixture.cases[0]!;
  await assertNoTensorLeak("grouping", async () => {
    const model = loadCase(c);
    const groups = c.groups.map((g) => tf.tensor4d(float32FromBase64(g.data), g.shape));
    // Splitting the groups back into single crops and regrouping gives the same groups.
    const crops = groups.flatMap((g) => tf.split(g, g.shape[0] / c.batch, 0) as tf.Tensor4D[]);
    const regrouped = groupCropsByResolution(crops);
    assert.equal(regrouped.length, groups.length);
    for (let i = 0; i < groups.length; i++) {
      assert.deepEqual(regrouped[i]!.shape, groups[i]!.shape);
      assert.deepEqual(await regrouped[i]!.data(), await groups[i]!.data());
    }
    // Eval mode: the result does not depend on how the crops are grouped.
    const grouped = modelForward(model, groups, { training: false });
    const single = modelForward(model, crops, { training: false });
    checkClose(
      "eval, grouped vs one crop per pass",
      await values(single.scores!),
      await values(grouped.scores!),
      1e-5,
    );
    // Train mode: BatchNorm statistics are per pass. Adjacent single crops of one size are merged back
    // into their resolution group (the reference's unique_consecutive), so they train alike; a group
    // passed on its own (a pass per resolution group vs one pass over the large crops' half) differs.
    const before = await values(model.param("backbone.bn1.running_mean"));
    const trainGrouped = modelForward(model, groups, { training: true });
    const trainSingle = modelForward(model, crops, { training: true });
    checkClose(
      "train, adjacent single crops merged",
      await values(trainSingle.features),
      await values(trainGrouped.features),
      1e-5,
    );
    const firstHalf = tf.split(groups[0]!, 2, 0) as tf.Tensor4D[];
    const trainHalf = modelForward(model, [firstHalf[0]!], { training: true });
    const groupedHalf = (await values(trainGrouped.features)).slice(0, trainHalf.features.size);
    assert.ok(relativeError(await values(trainHalf.features), groupedHalf) > 1e-3);
    assert.ok(relativeError(await values(model.param("backbone.bn1.running_mean")), before) > 1e-3);
    tf.dispose([...firstHalf, ...Object.values(trainHalf)]);
    tf.dispose([...groups, ...crops, ...regrouped]);
    tf.dispose([grouped, single, trainGrouped, trainSingle].flatMap((o) => Object.values(o)));
    disposeModel(model);
  });
});

Deno.test("several training steps keep the live tensor count flat", async () => {
  await initBackend("wasm");
  const config = await Effect.runPromise(
    decodeModelConfig({ arch: "resnet18", width: 2, stem: "cifar", hidden: 8, out: 4, prototypes: 5 }),
  );
  const model = makeSwavModel(config, 7);
  const groups = [tf.randomNormal([4, 8, 8, 3]) as tf.Tensor4D, tf.randomNormal([6, 4, 4, 3]) as tf.Tensor4D];
  const step = () => {
    const { value, grads } = tf.variableGrads(() => {
      const { scores } = modelForward(model, groups, { training: true });
      return tf.mean(tf.square(scores!));
    }, trainableVariables(model));
    tf.dispose([value, ...Object.values(grads)]);
  };
  step(); // first step: backend kernels may cache
  await assertNoTensorLeak("5 training steps", () => {
    for (let i = 0; i < 5; i++) step();
  });
  const bytes = tf.memory().numBytes;
  step();
  assert.equal(tf.memory().numBytes, bytes, "live bytes grew across a step");
  tf.dispose(groups);
  disposeModel(model);
});

Deno.test("initialisation: torchvision's distributions, deterministic per seed", async () => {
  await initBackend("wasm");
  const config = await Effect.runPromise(decodeModelConfig({ arch: "resnet18", width: 16, hidden: 64 }));
  const specs = modelParamSpecs(config);
  // Same seed, same values; another seed, other values.
  const conv = specs.findIndex((s) => s.name === "backbone.layer3.0.conv2.weight");
  assert.deepEqual(initialValues(specs[conv]!, 5, conv), initialValues(specs[conv]!, 5, conv));
  assert.ok(relativeError(initialValues(specs[conv]!, 5, conv), initialValues(specs[conv]!, 6, conv)) > 0.5);
  specs.forEach((spec, index) => {
    const v = initialValues(spec, 11, index);
    const n = v.length;
    const mean = v.reduce((a, b) => a + b, 0) / n;
    const std = Math.sqrt(v.reduce((a, b) => a + (b - mean) ** 2, 0) / n);
    switch (spec.init.kind) {
      case "ones":
        assert.ok(v.every((x) => x === 1), spec.name);
        break;
      case "zeros":
        assert.ok(v.every((x) => x === 0), spec.name);
        break;
      case "kaimingNormalFanOut": {
        // N(0, 2/fan_out): sample mean and std within 5 standard errors.
        const sigma = Math.sqrt(2 / spec.init.fanOut);
        assert.ok(Math.abs(mean) < 5 * sigma / Math.sqrt(n), `${spec.name} mean ${mean}`);
        assert.ok(Math.abs(std / sigma - 1) < 5 / Math.sqrt(2 * n), `${spec.name} std ${std} vs ${sigma}`);
        break;
      }
      case "uniformFanIn": {
        // U(±1/√fan_in): within bounds, std bound/√3 within 5 standard errors (kurtosis of U is 9/5).
        const bound = 1 / Math.sqrt(spec.init.fanIn);
        assert.ok(v.every((x) => Math.abs(x) <= bound), spec.name);
        if (n >= 64) {
          assert.ok(
            Math.abs(std / (bound / Math.sqrt(3)) - 1) < 5 * Math.sqrt(0.8 / (4 * n)),
            `${spec.name} std`,
          );
        }
        break;
      }
    }
  });
  // makeSwavModel uses these values, and two models can coexist (variable names stay unique).
  await assertNoTensorLeak("two models", async () => {
    const a = makeSwavModel(config, 5);
    const b = makeSwavModel(config, 5);
    const name = "backbone.layer3.0.conv2.weight";
    assert.deepEqual(await a.param(name).data(), await b.param(name).data());
    assert.deepEqual(await a.param(name).data(), initialValues(specs[conv]!, 5, conv));
    disposeModel(a);
    disposeModel(b);
  });
});

Deno.test("ModelConfig: defaults are the reference's; errors name the field", async () => {
  const defaults = await Effect.runPromise(decodeModelConfig({}));
  assert.deepEqual(defaults, {
    arch: "resnet50",
    width: 64,
    inputChannels: 3,
    stem: "imagenet",
    hidden: 2048,
    out: 128,
    prototypes: 3000,
    syncBatchNorm: true,
  });
  for (
    const [field, bad] of [
      ["arch", "resnet101"],
      ["width", 0],
      ["inputChannels", 2],
      ["stem", "tiny"],
      ["hidden", -1],
      ["out", 1.5],
      ["prototypes", "many"],
    ] as const
  ) {
    const exit = await Effect.runPromiseExit(decodeModelConfig({ [field]: bad }));
    assert.ok(Exit.isFailure(exit), `${field}=${bad} accepted`);
    assert.match(String(exit.cause), new RegExp(field), `error for ${field} does not name it: ${exit.cause}`);
  }
});

Deno.test("estimateMemory: at or above the measured peak of a training step, within 2x", async () => {
  // tf.profile's peak is engine-level accounting: the same on cpu and wasm.
  await initBackend("wasm");
  for (
    const raw of [
      { arch: "resnet18", width: 8, stem: "cifar", hidden: 32, out: 16, prototypes: 20 },
      { arch: "resnet18", width: 8, stem: "imagenet", hidden: 32, out: 16, prototypes: 20 },
      { arch: "resnet50", width: 4, stem: "imagenet", hidden: 16, out: 8, prototypes: 12 },
    ]
  ) {
    const config = await Effect.runPromise(decodeModelConfig(raw));
    const crops = { sizeCrops: [32, 16], nmbCrops: [2, 2] };
    const batch = 4;
    const before = tf.memory().numBytes;
    const model = makeSwavModel(config, 1);
    const groups = crops.sizeCrops.map((s, i) =>
      tf.randomNormal([batch * crops.nmbCrops[i]!, s, s, 3]) as tf.Tensor4D
    );
    // The training step's gradient walk (pipelines/swav_step.ts).
    const info = await tf.profile(() => {
      const { value, grads } = leanVariableGrads(() => {
        const { scores } = modelForward(model, groups, { training: true });
        return tf.mean(tf.square(scores!));
      }, trainableVariables(model));
      tf.dispose([value, ...Object.values(grads)]);
    });
    const estimate = estimateMemory(config, batch, crops);
    // The peak covers weights, inputs, forward, backward and gradients; an optimiser step adds
    // a momentum slot and an update temporary per parameter.
    const measured = info.peakBytes - before + 2 * 4 * estimate.parameterCount;
    const ratio = estimate.totalBytes / measured;
    console.log(`${raw.arch} ${raw.stem}: estimate / measured = ${ratio.toFixed(2)}`);
    assert.ok(ratio >= 1 && ratio < 2, `${raw.arch} ${raw.stem}: estimate / measured = ${ratio.toFixed(2)}`);
    tf.dispose(groups);
    disposeModel(model);
  }
});

Deno.test("model: `using` frees every variable (live tensor count back to where it was)", () => {
  const config = Effect.runSync(
    decodeModelConfig({ arch: "resnet18", width: 4, hidden: 8, out: 4, prototypes: 5 }),
  );
  const before = tf.memory().numTensors;
  {
    using model = makeSwavModel(config, 1);
    assert.ok(tf.memory().numTensors > before);
    assert.equal(model.params.length, modelParamSpecs(config).length);
  }
  assert.equal(tf.memory().numTensors, before, "live tensors back to where they were");
});

Deno.test("model: readModelArrays then loadModelArrays round-trips; a wrong name or shape is a ModelWeightsError", async () => {
  const config = Effect.runSync(
    decodeModelConfig({ arch: "resnet18", width: 4, hidden: 8, out: 4, prototypes: 5 }),
  );
  await assertNoTensorLeak("weights round trip", async () => {
    using a = makeSwavModel(config, 1);
    using b = makeSwavModel(config, 2);
    const arrays = await Effect.runPromise(readModelArrays(a));
    assert.deepEqual(arrays.map((x) => x.name), a.params.map((p) => p.name), "model.params order");
    Effect.runSync(loadModelArrays(b, arrays));
    for (const p of a.params) assert.deepEqual(await b.param(p.name).data(), await p.variable.data());

    const missing = Effect.runSyncExit(loadModelArrays(b, arrays.slice(1), "checkpoint x.json"));
    assert.ok(Exit.isFailure(missing));
    const first = a.params[0]!;
    assert.throws(
      () => Effect.runSync(loadModelArrays(b, arrays.slice(1), "checkpoint x.json")),
      (e: unknown) =>
        e instanceof ModelWeightsError && e.parameter === first.name &&
        e.message === `checkpoint x.json lacks parameter ${first.name}: another architecture?`,
    );
    const reshaped = arrays.map((x, i) => i === 0 ? { ...x, shape: [x.values.length] } : x);
    assert.throws(
      () => Effect.runSync(loadModelArrays(b, reshaped, "checkpoint x.json")),
      (e: unknown) =>
        e instanceof ModelWeightsError && e.parameter === first.name &&
        e.message.includes(`has shape [${first.variable.size}], the model [${first.variable.shape}]`),
    );
  });
});
