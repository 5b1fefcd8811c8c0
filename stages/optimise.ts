/**
 * The optimise stage: SGD with momentum and weight decay, wrapped by LARC, with
 * the learning rate set every iteration (linear warmup, then cosine to finalLr),
 * and the prototypes frozen for the first iterations. Matches main_swav.py with
 * apex's LARC (clip false, trust 0.001, eps 1e-8) around torch.optim.SGD.
 *
 * Per parameter p with gradient g, wd the group's weight decay, in this order:
 *
 *     if |p| != 0 and |g| != 0:                    (apex LARC)
 *         a = trust·|p| / (|g| + |p|·wd + eps)
 *         if clip: a = min(a / lr, 1)
 *         g = (g + wd·p) · a
 *     buf = momentum·buf + g                          (torch SGD, weight decay 0, dampening 0)
 *     p   = p − lr·buf
 *
 * Where |p| or |g| is 0 neither the scaling nor the weight decay applies (as in
 * apex). torch initialises the buffer to g on a parameter's first step; a zero
 * buffer gives the same value exactly (momentum·0 + g), so slots start at zero.
 * A parameter with no gradient, or one skipped (frozen prototypes: the
 * reference sets their `.grad = None`), gets no update, no weight decay, and
 * its momentum buffer is left as it was.
 *
 * On the wasm backend each parameter's update is one fused pass over the heap
 * (backend/fused_larc.ts, ~15x faster). Elsewhere all maths runs on the device
 * in one `tf.tidy` per step: the norms and the |p|, |g| != 0 test are tensor
 * ops (`tf.where`), nothing is read back.
 */
import * as tf from "@tensorflow/tfjs";
import type { NamedTensorMap, Variable } from "../backend/tensor_types.ts";
import { Effect, Schema, type Scope } from "effect";
import { fusedLarcStep } from "../backend/fused_larc.ts";
import { defineStage, type Stage } from "./stage.ts";
import { PROTOTYPES_WEIGHT } from "../models/head.ts";
import { NonNegative, NonNegativeInt, Positive, Probability, withDefault } from "../models/schema.ts";
import { kernelInvariant } from "../backend/invariant.ts";

/** LARC-SGD's settings for one optimiser (from a config through `larcOptions`). */
export interface LarcSgdOptions {
  /** SGD momentum (reference 0.9). */
  readonly momentum: number;
  /** SGD weight decay, absorbed by LARC (added to the gradient before scaling). */
  readonly weightDecay: number;
  /** LARC trust coefficient (reference 0.001). */
  readonly trustCoefficient: number;
  /** LARC eps in the denominator (reference 1e-8). */
  readonly eps: number;
  /** LARC clipping: the effective rate is min(adaptive, lr). The reference uses false. */
  readonly clip: boolean;
}

/** A schedule given per iteration, as main_swav.py builds it. */
export interface LrSchedule {
  /** Iterations of linear warmup (len(train_loader) * warmup_epochs). */
  readonly warmupIters: number;
  /** All iterations (len(train_loader) * epochs). */
  readonly totalIters: number;
  readonly startWarmup: number;
  readonly baseLr: number;
  readonly finalLr: number;
}

/**
 * The learning rate at `iteration` (0-based): np.linspace(startWarmup, baseLr,
 * warmupIters) then finalLr + ½(baseLr − finalLr)(1 + cos(π t / (total − warmup))).
 * Past the end of the schedule it stays at finalLr.
 */
export const learningRateAt = (iteration: number, schedule: LrSchedule): number => {
  const { warmupIters: w, totalIters, startWarmup, baseLr, finalLr } = schedule;
  if (iteration < w) {
    // np.linspace(a, b, n)[i] = a + i (b − a) / (n − 1); for n = 1 it is [a].
    return w === 1 ? startWarmup : startWarmup + (iteration * (baseLr - startWarmup)) / (w - 1);
  }
  const cosineIters = totalIters - w;
  if (cosineIters <= 0) return finalLr;
  const t = Math.min(iteration - w, cosineIters);
  return finalLr + 0.5 * (baseLr - finalLr) * (1 + Math.cos((Math.PI * t) / cosineIters));
};

/** The per-iteration schedule for an epoch-based config (as main_swav.py: epochs times loader length). */
export const scheduleFromEpochs = (options: {
  readonly epochs: number;
  readonly warmupEpochs: number;
  readonly itersPerEpoch: number;
  readonly startWarmup: number;
  readonly baseLr: number;
  readonly finalLr: number;
}): LrSchedule => ({
  warmupIters: Math.round(options.itersPerEpoch * options.warmupEpochs),
  totalIters: options.itersPerEpoch * options.epochs,
  startWarmup: options.startWarmup,
  baseLr: options.baseLr,
  finalLr: options.finalLr,
});

/** Momentum slots as plain arrays, for checkpoints. */
export type SerialisedSlots = Record<
  string,
  { readonly shape: readonly number[]; readonly values: Float32Array }
>;

/**
 * LARC-wrapped SGD with momentum. Owns its momentum slots (non-trainable
 * variables, keyed by the parameter's name); `dispose` (or `using`) frees them.
 * Inside Effect, `makeLarcSgd` ties the disposal to a scope.
 */
export class LarcSgd {
  readonly #slots = new Map<string, Variable>();

  /**
   * An optimiser with no momentum slots yet (each is made on its variable's first step).
   * @param options the LARC-SGD settings
   * @param fused use the one-pass update where the backend has one (wasm); false
   *   forces the tensor-op version (tests compare the two).
   */
  constructor(readonly options: LarcSgdOptions, readonly fused = true) {}

  /**
   * One step at learning rate `lr`: updates each variable named in `grads` in
   * place, except those for which `skip(name)` is true (they keep their value and
   * momentum buffer).
   */
  step(
    variables: Readonly<Record<string, Variable>>,
    grads: NamedTensorMap,
    lr: number,
    skip: (name: string) => boolean = () => false,
  ): void {
    const { momentum, weightDecay, trustCoefficient, eps, clip } = this.options;
    tf.tidy(() => {
      for (const [name, grad] of Object.entries(grads)) {
        if (grad == null || skip(name)) continue;
        const param = variables[name];
        // A programming error inside the synchronous update (a tf.tidy): no Effect channel here.
        kernelInvariant(
          param !== undefined,
          () => `LarcSgd.step: no variable named "${name}" for its gradient`,
        );
        let slot = this.#slots.get(name);
        if (slot === undefined) {
          // Created outside this tidy's bookkeeping: tf.variable is kept until disposed.
          slot = tf.variable(tf.zerosLike(param), false);
          this.#slots.set(name, slot);
        }
        if (this.fused && fusedLarcStep(param, grad, slot, { ...this.options, lr })) continue;
        const paramNorm = tf.norm(param);
        const gradNorm = tf.norm(grad);
        const apply = tf.logicalAnd(tf.greater(paramNorm, 0), tf.greater(gradNorm, 0));
        let adaptive = tf.div(
          tf.mul(trustCoefficient, paramNorm),
          tf.add(tf.add(gradNorm, tf.mul(paramNorm, weightDecay)), eps),
        );
        if (clip) adaptive = tf.minimum(tf.div(adaptive, lr), 1);
        const scale = tf.where(apply, adaptive, tf.onesLike(adaptive));
        const decay = tf.where(apply, tf.fill([], weightDecay), tf.zerosLike(adaptive));
        const update = tf.mul(tf.add(grad, tf.mul(decay, param)), scale);
        const buffer = tf.add(tf.mul(slot, momentum), update);
        slot.assign(buffer);
        param.assign(tf.sub(param, tf.mul(buffer, lr)));
      }
    });
  }

  /** The parameter names that have a momentum slot. */
  get slotNames(): readonly string[] {
    return [...this.#slots.keys()];
  }

  /** Copies the momentum slots to plain arrays (asynchronous reads: works on every backend). */
  async serialise(): Promise<SerialisedSlots> {
    const out: Record<string, { shape: number[]; values: Float32Array }> = {};
    for (const [name, slot] of this.#slots) {
      out[name] = { shape: [...slot.shape], values: Float32Array.from(await slot.data()) };
    }
    return out;
  }

  /** Replaces all momentum slots with `slots` (for example read from a checkpoint). */
  restore(slots: SerialisedSlots): void {
    for (const [name, { shape, values }] of Object.entries(slots)) {
      const size = shape.reduce((a, b) => a * b, 1);
      // Synchronous method of a plain-TypeScript class (also used outside Effect): a caller bug.
      kernelInvariant(
        values.length === size,
        () => `LarcSgd.restore: slot "${name}" has ${values.length} values for shape [${shape}]`,
      );
    }
    this.dispose();
    for (const [name, { shape, values }] of Object.entries(slots)) {
      const initial = tf.tensor(values, [...shape], "float32");
      this.#slots.set(name, tf.variable(initial, false));
      initial.dispose();
    }
  }

  /** Frees the momentum slots; the optimiser can still be used (slots restart at zero). */
  dispose(): void {
    for (const slot of this.#slots.values()) slot.dispose();
    this.#slots.clear();
  }

  /** `using optimiser = new LarcSgd(...)` frees the slots at the end of the block. */
  [Symbol.dispose](): void {
    this.dispose();
  }
}

/** A LARC-SGD optimiser whose momentum slots are disposed when the scope closes. */
export const makeLarcSgd = (options: LarcSgdOptions): Effect.Effect<LarcSgd, never, Scope.Scope> =>
  Effect.acquireRelease(
    Effect.sync(() => new LarcSgd(options)),
    (optimiser) => Effect.sync(() => optimiser.dispose()),
  );

/** LARC-SGD's settings, with the reference's defaults (the run config's `optim` section holds them). */
export const larcFields = {
  momentum: withDefault(Probability, 0.9),
  /** SGD weight decay, absorbed by LARC. */
  weightDecay: withDefault(NonNegative, 1e-6),
  /** LARC trust coefficient. */
  trust: withDefault(Positive, 0.001),
  /** LARC eps in the adaptive rate's denominator. */
  eps: withDefault(NonNegative, 1e-8),
  /** LARC clipping (the effective rate is min(adaptive, lr)). */
  clip: withDefault(Schema.Boolean, false),
};

/** The learning-rate schedule's settings (batch-256 recipe; the run config's `optim` section holds them). */
export const scheduleFields = {
  baseLr: withDefault(Positive, 0.6),
  finalLr: withDefault(NonNegative, 0.0006),
  startWarmup: withDefault(NonNegative, 0),
  warmupEpochs: withDefault(NonNegative, 0),
};

/** Prototype freezing (the run config's `swav` section holds it). */
export const freezeFields = {
  /** Iterations during which the prototypes are frozen (main_swav.py's freeze_prototypes_niters). */
  freezePrototypesIters: withDefault(NonNegativeInt, 313),
};

/** A validated optimise config: LARC-SGD, the learning-rate schedule and the prototype freezing. */
export interface OptimiseConfig {
  /** SGD momentum (default 0.9). */
  readonly momentum: number;
  /** SGD weight decay, absorbed by LARC (default 1e-6). */
  readonly weightDecay: number;
  /** LARC trust coefficient (default 0.001). */
  readonly trust: number;
  /** LARC eps in the adaptive rate's denominator (default 1e-8). */
  readonly eps: number;
  /** LARC clipping: the effective rate is min(adaptive, lr) (default false). */
  readonly clip: boolean;
  /** Learning rate after the warm-up, for a batch of 256 (default 0.6). */
  readonly baseLr: number;
  /** Learning rate the cosine decay ends at (default 0.0006). */
  readonly finalLr: number;
  /** Learning rate the linear warm-up starts from (default 0). */
  readonly startWarmup: number;
  /** Warm-up length in epochs (default 0). */
  readonly warmupEpochs: number;
  /** Iterations during which the prototypes are frozen (default 313, main_swav.py's freeze_prototypes_niters). */
  readonly freezePrototypesIters: number;
}

/** The optimise stage's config schema, with the reference's defaults. */
export const OptimiseConfig: Schema.Codec<OptimiseConfig, Partial<OptimiseConfig>> = Schema.Struct({
  ...larcFields,
  ...scheduleFields,
  ...freezeFields,
});

/** What the optimise stage takes: the optimiser, the variables and their gradients, and where the step is in the schedule. */
export interface OptimiseInput {
  /** The optimiser (its momentum slots), from `makeLarcSgd` with `larcOptions(config)`. */
  readonly optimiser: LarcSgd;
  /** Trainable variables by name (the names `tf.variableGrads` keys the gradients by). */
  readonly variables: Readonly<Record<string, Variable>>;
  /** Gradient of the loss for each variable, by name (owned by the caller). */
  readonly grads: NamedTensorMap;
  /** 0-based global iteration: epoch * itersPerEpoch + index in the epoch. */
  readonly iteration: number;
  /** Optimiser steps per epoch. */
  readonly itersPerEpoch: number;
  /** The schedule's length in epochs (the run's `train.epochs`). */
  readonly epochs: number;
}

/** What the optimise stage reports about the step it took. */
export interface OptimiseOutput {
  /** The learning rate the step used. */
  readonly learningRate: number;
  /** Whether the prototypes were held still in this step. */
  readonly prototypesFrozen: boolean;
}

/** The optimiser options of a validated optimise config. */
export const larcOptions = (config: Pick<OptimiseConfig, keyof typeof larcFields>): LarcSgdOptions => ({
  momentum: config.momentum,
  weightDecay: config.weightDecay,
  trustCoefficient: config.trust,
  eps: config.eps,
  clip: config.clip,
});

/**
 * optimise stage: sets the learning rate for this iteration, then one LARC-SGD
 * step in place; while frozen, the prototypes (`PROTOTYPES_WEIGHT`, or every
 * head's `prototypes.*`) keep their value and momentum. The gradients stay owned
 * by the caller.
 *
 * @example One LARC-SGD step on one variable, at the schedule's first iteration
 * ```ts
 * import * as tf from "@tensorflow/tfjs";
 * import { Effect } from "effect";
 * import assert from "node:assert/strict";
 * import { configure, initBackend, makeLarcSgd, optimiseStage } from "@swav/swav-ts";
 *
 * await initBackend("cpu");
 * const w = tf.variable(tf.tensor1d([1, 2, 3]));
 * const result = await Effect.runPromise(Effect.scoped(Effect.gen(function* () {
 *   const optimise = yield* configure(optimiseStage, { baseLr: 0.1, warmupEpochs: 0, freezePrototypesIters: 0 });
 *   const optimiser = yield* makeLarcSgd({ momentum: 0.9, weightDecay: 0, trustCoefficient: 0.001, eps: 1e-8, clip: false });
 *   const grads = { w: tf.ones([3]) };
 *   const out = yield* optimise({ optimiser, variables: { w }, grads, iteration: 0, itersPerEpoch: 10, epochs: 1 });
 *   grads.w.dispose();
 *   return out;
 * })));
 * assert.ok(Math.abs(result.learningRate - 0.1) < 1e-9); // the cosine schedule starts at baseLr
 * const [after] = [await w.data()];
 * assert.ok(after[0]! < 1 && after[2]! < 3); // moved against the gradient
 * w.dispose();
 * ```
 */
export const optimiseStage: Stage<OptimiseInput, OptimiseOutput, OptimiseConfig> = defineStage<
  OptimiseInput,
  OptimiseOutput,
  OptimiseConfig
>({
  name: "optimise",
  config: OptimiseConfig,
  run: (config) => ({ optimiser, variables, grads, iteration, itersPerEpoch, epochs }) =>
    Effect.sync(() => {
      const learningRate = learningRateAt(
        iteration,
        scheduleFromEpochs({ ...config, epochs, itersPerEpoch }),
      );
      const prototypesFrozen = iteration < config.freezePrototypesIters;
      optimiser.step(
        variables,
        grads,
        learningRate,
        // SwAV's `prototypes.weight` and DeepCluster-v2's `prototypes.prototypes{h}.weight` alike.
        (name) => prototypesFrozen && (name === PROTOTYPES_WEIGHT || name.startsWith("prototypes.")),
      );
      return { learningRate, prototypesFrozen };
    }),
});
