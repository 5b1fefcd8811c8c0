import * as tf from "@tensorflow/tfjs";
import assert from "node:assert/strict";
import fc from "fast-check";
import { Effect, Exit, Schema } from "effect";
import { initBackend, resolveBackendName } from "../backend/tensor_backend.ts";
import {
  larcOptions,
  LarcSgd,
  type LarcSgdOptions,
  learningRateAt,
  makeLarcSgd,
  OptimiseConfig,
  optimiseStage,
  scheduleFromEpochs,
} from "../stages/optimise.ts";
import { configure } from "../stages/stage.ts";
import { assertNoTensorLeak, relativeError, values } from "./_helpers.ts";

interface OptimiserCase {
  name: string;
  momentum: number;
  weightDecay: number;
  trustCoefficient: number;
  clip: boolean;
  eps: number;
  freezePrototypesIters: number;
  shapes: Record<string, number[]>;
  initial: Record<string, number[]>;
  steps: { lr: number; grads: Record<string, number[]>; params: Record<string, number[]> }[];
}
interface ScheduleCase {
  startWarmup: number;
  baseLr: number;
  finalLr: number;
  warmupIters: number;
  totalIters: number;
  lrs: number[];
}
const fixture = JSON.parse(await Deno.readTextFile(new URL("./fixtures/core.json", import.meta.url))) as {
  optimiser: OptimiserCase[];
  schedule: ScheduleCase[];
};

await initBackend(await Effect.runPromise(resolveBackendName(undefined, "cpu")));

/**
 * Norm-wise relative error of the parameters after each step, float32 against
 * float64 torch. LARC steps are small (trust 0.001), so the parameters stay near
 * their float32-rounded start. Measured: below 1e-7.
 */
const PARAM_TOLERANCE = 1e-6;
/**
 * The same for the accumulated change p_t − p_0, which the small steps make
 * sensitive to float32 rounding of p (one ulp of p against an update of ~1e-4·|p|).
 * Measured: 5e-7 to 4.3e-4; this still catches any error in the update's form
 * larger than a few parts in a thousand.
 */
const CHANGE_TOLERANCE = 2e-3;

/** A variable initialised from `make`, the initial tensor disposed (a variable survives tidy). */
const owned = (make: () => tf.Tensor): tf.Variable => tf.tidy(() => tf.variable(make()));

const variablesFrom = (shapes: Record<string, number[]>, initial: Record<string, number[]>) =>
  Object.fromEntries(
    Object.entries(shapes).map(([name, shape]) => [name, owned(() => tf.tensor(initial[name]!, shape))]),
  );

const gradsFrom = (shapes: Record<string, number[]>, grads: Record<string, number[]>): tf.NamedTensorMap =>
  Object.fromEntries(Object.entries(shapes).map(([name, shape]) => [name, tf.tensor(grads[name]!, shape)]));

/** Float64 transcription of apex LARC around torch SGD for one parameter; independent of tf. */
const larcSgd64 = (
  p: Float64Array,
  g: ArrayLike<number>,
  buf: Float64Array,
  lr: number,
  o: LarcSgdOptions,
): void => {
  const norm = (x: ArrayLike<number>) => Math.sqrt(Array.from(x).reduce((s, v) => s + v * v, 0));
  const pn = norm(p);
  const gn = norm(g);
  const d = Float64Array.from(g);
  if (pn !== 0 && gn !== 0) {
    let a = (o.trustCoefficient * pn) / (gn + pn * o.weightDecay + o.eps);
    if (o.clip) a = Math.min(a / lr, 1);
    for (let i = 0; i < d.length; i++) d[i] = (d[i]! + o.weightDecay * p[i]!) * a;
  }
  for (let i = 0; i < d.length; i++) {
    buf[i] = o.momentum * buf[i]! + d[i]!;
    p[i] = p[i]! - lr * buf[i]!;
  }
};

Deno.test("learningRateAt", async (t) => {
  await t.step("equals main_swav.py's schedule (numpy, float64) at every iteration", () => {
    for (const c of fixture.schedule) {
      assert.equal(c.lrs.length, c.totalIters);
      c.lrs.forEach((ref, it) => {
        const got = learningRateAt(it, c);
        assert.ok(Math.abs(got - ref) <= 1e-12 * Math.max(1, Math.abs(ref)), `it ${it}: ${got} vs ${ref}`);
      });
    }
  });

  await t.step("stays at finalLr past the end; scheduleFromEpochs multiplies by the loader length", () => {
    const s = scheduleFromEpochs({
      epochs: 10,
      warmupEpochs: 2,
      itersPerEpoch: 7,
      startWarmup: 0,
      baseLr: 1,
      finalLr: 0.01,
    });
    assert.deepEqual([s.warmupIters, s.totalIters], [14, 70]);
    assert.equal(learningRateAt(70, s), 0.01);
    assert.equal(learningRateAt(1000, s), 0.01);
    assert.equal(learningRateAt(14, s), 1);
  });
});

/** Every fixture case of core.json (apex LARC + torch SGD in float64), step by step. */
const checkAgainstFixture = async (fused: boolean): Promise<void> => {
  for (const c of fixture.optimiser) {
    await assertNoTensorLeak(c.name, async () => {
      const variables = variablesFrom(c.shapes, c.initial);
      const optimiser = new LarcSgd({ ...c }, fused);
      for (const [it, step] of c.steps.entries()) {
        const grads = gradsFrom(c.shapes, step.grads);
        optimiser.step(
          variables,
          grads,
          step.lr,
          (name) => it < c.freezePrototypesIters && name === "prototypes",
        );
        tf.dispose(grads);
        for (const [name, v] of Object.entries(variables)) {
          const got = await values(v);
          const err = relativeError(got, step.params[name]!);
          assert.ok(err < PARAM_TOLERANCE, `${c.name}, step ${it}, ${name}: rel err ${err}`);
          // our start is the float32-rounded initial value; torch's the float64 one
          const start32 = Float32Array.from(c.initial[name]!);
          const change = got.map((x, i) => x - start32[i]!);
          const refChange = step.params[name]!.map((x, i) => x - c.initial[name]![i]!);
          const changeErr = relativeError(change, refChange);
          assert.ok(
            changeErr < CHANGE_TOLERANCE,
            `${c.name}, step ${it}, ${name}: change rel err ${changeErr}`,
          );
        }
        // the momentum buffer of frozen prototypes is not touched
        if (it < c.freezePrototypesIters) {
          assert.ok(!optimiser.slotNames.includes("prototypes"));
        }
      }
      optimiser.dispose();
      tf.dispose(Object.values(variables));
    });
  }
};

/** Fresh random parameters and gradients against the float64 transcription `larcSgd64`. */
const checkAgainstTranscription = async (fused: boolean): Promise<void> => {
  await assertNoTensorLeak("random", async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.integer({ min: 1, max: 40 }),
        fc.record({
          momentum: fc.constantFrom(0, 0.9),
          weightDecay: fc.constantFrom(0, 1e-6, 0.01),
          trustCoefficient: fc.constantFrom(0.001, 0.02),
          eps: fc.constant(1e-8),
          clip: fc.boolean(),
        }),
        fc.integer(),
        async (size, options, seed) => {
          const param = owned(() => tf.randomNormal([size], 0, 1, "float32", seed));
          const p64 = await values(param);
          const buf64 = new Float64Array(size);
          const optimiser = new LarcSgd(options, fused);
          for (let it = 0; it < 4; it++) {
            const lr = 0.1 + it * 0.2;
            const grad = tf.randomNormal([size], 0, 0.5, "float32", seed + it + 1);
            const g = await values(grad);
            optimiser.step({ w: param }, { w: grad }, lr);
            larcSgd64(p64, g, buf64, lr, options);
            grad.dispose();
          }
          const got = await values(param);
          optimiser.dispose();
          param.dispose();
          assert.ok(relativeError(got, p64) < PARAM_TOLERANCE, `rel err ${relativeError(got, p64)}`);
        },
      ),
      { numRuns: 30 },
    );
  });
};

Deno.test("LarcSgd", async (t) => {
  await t.step(
    "matches apex LARC + torch SGD (float64) over several steps, with frozen prototypes",
    () => checkAgainstFixture(true),
  );

  await t.step(
    "fresh random parameters and gradients: equals a float64 transcription",
    () => checkAgainstTranscription(true),
  );

  await t.step("serialise then restore continues exactly", async () => {
    await assertNoTensorLeak("serialise", async () => {
      const c = fixture.optimiser.find((x) => x.freezePrototypesIters === 0)!;
      const vars1 = variablesFrom(c.shapes, c.initial);
      const first = new LarcSgd({ ...c });
      for (const step of c.steps.slice(0, 3)) {
        const grads = gradsFrom(c.shapes, step.grads);
        first.step(vars1, grads, step.lr);
        tf.dispose(grads);
      }
      const saved = await first.serialise();
      assert.deepEqual(Object.keys(saved).sort(), Object.keys(c.shapes).sort());
      // a fresh optimiser on a copy of the parameters, restored from plain arrays
      const vars2 = Object.fromEntries(Object.entries(vars1).map(([n, v]) => [n, owned(() => v.clone())]));
      const second = new LarcSgd({ ...c });
      second.restore(structuredClone(saved));
      for (const step of c.steps.slice(3)) {
        for (const [opt, vars] of [[first, vars1], [second, vars2]] as const) {
          const grads = gradsFrom(c.shapes, step.grads);
          opt.step(vars, grads, step.lr);
          tf.dispose(grads);
        }
      }
      for (const name of Object.keys(c.shapes)) {
        assert.deepEqual(await values(vars2[name]!), await values(vars1[name]!), name);
      }
      first.dispose();
      second.dispose();
      tf.dispose([...Object.values(vars1), ...Object.values(vars2)]);
    });
  });

  await t.step("50 steps: live tensors flat; the scope disposes the slots", async () => {
    await assertNoTensorLeak("scope", async () => {
      const variables = {
        a: owned(() => tf.randomNormal([8, 4], 0, 1, "float32", 1)),
        b: owned(() => tf.zeros([4])),
      };
      await Effect.runPromise(Effect.scoped(Effect.gen(function* () {
        const optimiser = yield* makeLarcSgd({
          momentum: 0.9,
          weightDecay: 1e-6,
          trustCoefficient: 0.001,
          eps: 1e-8,
          clip: false,
        });
        const counts: number[] = [];
        for (let i = 0; i < 50; i++) {
          const grads = tf.tidy(() => ({ a: tf.randomNormal([8, 4], 0, 1, "float32", i), b: tf.ones([4]) }));
          optimiser.step(variables, grads, 0.1);
          tf.dispose(grads);
          counts.push(tf.memory().numTensors);
        }
        assert.ok(
          counts.every((n) => n === counts[0]),
          `live tensors drifted: ${counts[0]} .. ${counts.at(-1)}`,
        );
      })));
      tf.dispose(Object.values(variables));
    });
  });
});

Deno.test("optimise stage", async (t) => {
  await t.step("sets the rate from the schedule and holds the prototypes still while frozen", async () => {
    await assertNoTensorLeak("stage", async () => {
      const raw = { baseLr: 0.5, finalLr: 0.005, warmupEpochs: 1, freezePrototypesIters: 2 };
      const step = await Effect.runPromise(configure(optimiseStage, raw));
      const variables = {
        "head/kernel": owned(() => tf.randomNormal([3, 2], 0, 1, "float32", 3)),
        "prototypes.weight": owned(() => tf.randomNormal([4, 2], 0, 1, "float32", 4)),
      };
      await Effect.runPromise(Effect.scoped(Effect.gen(function* () {
        const optimiser = yield* makeLarcSgd({
          momentum: 0.9,
          weightDecay: 1e-6,
          trustCoefficient: 0.001,
          eps: 1e-8,
          clip: false,
        });
        for (let iteration = 0; iteration < 4; iteration++) {
          const before = yield* Effect.promise(() => values(variables["prototypes.weight"]));
          const grads = tf.tidy(() => ({
            "head/kernel": tf.onesLike(variables["head/kernel"]),
            "prototypes.weight": tf.onesLike(variables["prototypes.weight"]),
          }));
          const out = yield* step({ optimiser, variables, grads, iteration, itersPerEpoch: 4, epochs: 3 });
          tf.dispose(grads);
          const after = yield* Effect.promise(() => values(variables["prototypes.weight"]));
          const schedule = scheduleFromEpochs({
            epochs: 3,
            warmupEpochs: 1,
            itersPerEpoch: 4,
            startWarmup: 0,
            baseLr: 0.5,
            finalLr: 0.005,
          });
          assert.equal(out.learningRate, learningRateAt(iteration, schedule));
          assert.equal(out.prototypesFrozen, iteration < 2);
          if (iteration < 2) assert.deepEqual(after, before);
          else if (out.learningRate > 0) assert.notDeepEqual(after, before);
        }
      })));
      tf.dispose(Object.values(variables));
    });
  });

  await t.step("defaults are the reference's; a bad field is named", async () => {
    const config = await Effect.runPromise(Schema.decodeUnknownEffect(OptimiseConfig)({}));
    assert.deepEqual(config, {
      momentum: 0.9,
      weightDecay: 1e-6,
      trust: 0.001,
      eps: 1e-8,
      clip: false,
      baseLr: 0.6,
      finalLr: 0.0006,
      startWarmup: 0,
      warmupEpochs: 0,
      freezePrototypesIters: 313,
    });
    assert.deepEqual(larcOptions(config), {
      momentum: 0.9,
      weightDecay: 1e-6,
      trustCoefficient: 0.001,
      eps: 1e-8,
      clip: false,
    });
    for (
      const [raw, field] of [
        [{ momentum: 2 }, "momentum"],
        [{ weightDecay: -1 }, "weightDecay"],
        [{ warmupEpochs: -1 }, "warmupEpochs"],
        [{ freezePrototypesIters: 1.5 }, "freezePrototypesIters"],
        [{ clip: "no" }, "clip"],
      ] as const
    ) {
      const failed = await Effect.runPromiseExit(configure(optimiseStage, raw));
      assert.ok(Exit.isFailure(failed), field);
      assert.match(String(failed.cause), new RegExp(field));
    }
  });
});

Deno.test("LarcSgd on the wasm backend: the fused one-pass update", async (t) => {
  const previous = tf.getBackend();
  await initBackend("wasm");
  try {
    await t.step(
      "fused: matches apex LARC + torch SGD (float64), with frozen prototypes",
      () => checkAgainstFixture(true),
    );
    await t.step(
      "fused: fresh random parameters and gradients equal a float64 transcription",
      () => checkAgainstTranscription(true),
    );
    await t.step("tensor-op version on wasm: the same references", async () => {
      await checkAgainstFixture(false);
      await checkAgainstTranscription(false);
    });
    await t.step("fused and tensor-op agree on large random parameters over 20 steps", async () => {
      await assertNoTensorLeak("fused vs tensor ops", async () => {
        const seed = Date.now() % 100000;
        const shapes = { conv: [3, 3, 16, 32], dense: [257, 129], bias: [129], zero: [7] };
        const make = () =>
          Object.fromEntries(
            Object.entries(shapes).map(([name, shape], i) => [
              name,
              owned(() =>
                name === "zero" ? tf.zeros(shape) : tf.randomNormal(shape, 0, 1, "float32", seed + i)
              ),
            ]),
          );
        const [fusedVars, plainVars] = [make(), make()];
        const options = { momentum: 0.9, weightDecay: 1e-4, trustCoefficient: 0.02, eps: 1e-8, clip: false };
        const fused = new LarcSgd(options, true);
        const plain = new LarcSgd(options, false);
        const counts: number[] = [];
        for (let it = 0; it < 20; it++) {
          const grads = tf.tidy(() =>
            Object.fromEntries(
              Object.entries(shapes).map(([name, shape], i) => [
                name,
                tf.randomNormal(shape, 0, 0.1, "float32", seed + 100 * it + i),
              ]),
            )
          );
          fused.step(fusedVars, grads, 0.5, (name) => it < 3 && name === "bias");
          plain.step(plainVars, grads, 0.5, (name) => it < 3 && name === "bias");
          tf.dispose(Object.values(grads));
          counts.push(tf.memory().numTensors);
        }
        for (const name of Object.keys(shapes)) {
          const err = relativeError(await values(fusedVars[name]!), await values(plainVars[name]!));
          // float64 sums and products against float32 tensor ops: a few float32 ulps per step.
          assert.ok(err < 1e-5, `seed ${seed}, ${name}: fused vs tensor ops rel err ${err}`);
        }
        // Flat once every slot exists (the bias's first update is step 3).
        const settled = counts.slice(3);
        assert.ok(settled.every((n) => n === settled[0]), `live tensors drifted: ${counts}`);
        fused.dispose();
        plain.dispose();
        tf.dispose([...Object.values(fusedVars), ...Object.values(plainVars)]);
      });
    });
  } finally {
    await tf.setBackend(previous);
  }
});

Deno.test("LarcSgd with `using` frees its momentum slots at the end of the block", async () => {
  await assertNoTensorLeak("using", () => {
    const initial = tf.ones([3]);
    const variable = tf.variable(initial);
    initial.dispose();
    {
      using optimiser = new LarcSgd({
        momentum: 0.9,
        weightDecay: 0,
        trustCoefficient: 0.001,
        eps: 1e-8,
        clip: false,
      });
      tf.tidy(() => optimiser.step({ w: variable }, { w: tf.onesLike(variable) }, 0.1));
      assert.deepEqual(optimiser.slotNames, ["w"]);
    }
    variable.dispose();
    return Promise.resolve();
  });
});
