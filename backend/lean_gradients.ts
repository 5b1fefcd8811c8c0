/**
 * `tf.variableGrads` with a backward pass that frees memory as it goes.
 *
 * TF.js's `Engine.gradients` walks the tape in reverse inside one `tidy`: every
 * intermediate gradient and every tensor a kernel saved for its backward stays
 * alive until the whole backward pass ends. For a ResNet that is the forward's
 * saved activations plus a gradient for every activation at the peak, about
 * twice what the walk needs. Here the walk is the same (same nodes, same order,
 * same accumulation, so the same gradients bit for bit), but after a node's
 * input gradients exist, its output gradients and its saved tensors are
 * disposed: each is used by that node only, because the tape is in
 * topological order and an output's gradient is complete once every consumer
 * (a later node) has been walked.
 *
 * It reads TF.js engine internals (`state.activeTape`, `startTape`/`endTape`,
 * tape nodes' `gradient`/`saved`), checked at call time: where they are not
 * as expected (another TF.js version), or inside another gradient computation,
 * it runs `tf.variableGrads` instead.
 */
import * as tf from "@tensorflow/tfjs";
import { kernelInvariant } from "./invariant.ts";

interface TapeNode {
  readonly id: number;
  readonly kernelName: string;
  readonly inputs: Record<string, tf.Tensor>;
  readonly outputs: tf.Tensor[];
  readonly saved?: tf.Tensor[];
  readonly gradient?: (dys: (tf.Tensor | null)[]) => Record<string, () => tf.Tensor>;
}

interface EngineInternals {
  readonly state: { activeTape: TapeNode[] | null; gradientDepth: number };
  startTape(): void;
  endTape(): void;
  tidy<T extends tf.TensorContainer>(nameOrFn: string | (() => T), fn?: () => T): T;
  scopedRun<T>(start: () => void, end: () => void, f: () => T): T;
}

/**
 * Tensors whose gradient is zero by construction (the outputs of ops that
 * detach: `withoutGradient`). The walk treats them as constants: the ops that
 * made them and everything computed from them alone are left out, so no zero
 * gradient is computed and carried back (for SwAV's codes: their split,
 * concat and zeros on every step).
 */
const constants = new WeakSet<tf.Tensor>();

/** Declares `t`'s gradient zero: `leanVariableGrads` propagates nothing through it. */
export const markConstant = <T extends tf.Tensor>(t: T): T => {
  constants.add(t);
  return t;
};

const engineInternals = (): EngineInternals | undefined => {
  const engine = tf.engine() as unknown as Partial<EngineInternals>;
  const ok = engine.state !== undefined && typeof engine.state.gradientDepth === "number" &&
    typeof engine.startTape === "function" && typeof engine.endTape === "function" &&
    typeof engine.scopedRun === "function";
  return ok ? engine as EngineInternals : undefined;
};

/**
 * The nodes on a path from some x to y, each with only its inputs that depend
 * on an x (TF.js's `getFilteredNodesXToY`, which tfjs-core does not export),
 * where a constant (`markConstant`) depends on nothing.
 */
const nodesFromXToY = (tape: readonly TapeNode[], xs: readonly tf.Tensor[], y: tf.Tensor): TapeNode[] => {
  const fromX = new Set(xs.map((x) => x.id));
  const nodesFromX = new Set<number>();
  for (const node of tape) {
    if (Object.values(node.inputs).some((input) => fromX.has(input.id))) {
      const live = node.outputs.filter((output) => !constants.has(output));
      for (const output of live) fromX.add(output.id);
      if (live.length > 0) nodesFromX.add(node.id);
    }
  }
  const toY = new Set([y.id]);
  const nodesToY = new Set<number>();
  for (let i = tape.length - 1; i >= 0; i--) {
    const node = tape[i]!;
    if (node.outputs.some((output) => toY.has(output.id))) {
      for (const input of Object.values(node.inputs)) toY.add(input.id);
      nodesToY.add(node.id);
    }
  }
  return tape.filter((node) => nodesFromX.has(node.id) && nodesToY.has(node.id)).map((node) => ({
    ...node,
    inputs: Object.fromEntries(Object.entries(node.inputs).filter(([, input]) => fromX.has(input.id))),
  }));
};

/**
 * The value of the scalar `f()` and its gradients with respect to `variables`
 * (keyed by variable name, as `tf.variableGrads`; a variable `f` does not reach
 * has no entry). The caller owns the returned tensors.
 */
export const leanVariableGrads = (
  f: () => tf.Scalar,
  variables: readonly tf.Variable[],
): { value: tf.Scalar; grads: tf.NamedTensorMap } => {
  const engine = engineInternals();
  if (engine === undefined || engine.state.gradientDepth !== 0) {
    return tf.variableGrads(f, variables as tf.Variable[]);
  }
  const y = engine.scopedRun(
    () => engine.startTape(),
    () => engine.endTape(),
    () => engine.tidy("forward", f),
  );
  const tape = engine.state.activeTape ?? [];
  kernelInvariant(
    y instanceof tf.Tensor && y.rank === 0,
    () => `leanVariableGrads: f must return a scalar tensor, got ${y instanceof tf.Tensor ? y.shape : y}`,
  );
  try {
    const grads = engine.tidy("backward", () => {
      const gradientOf = new Map<number, tf.Tensor>([[y.id, tf.onesLike(y)]]);
      const walk = nodesFromXToY(tape, variables, y);
      for (let i = walk.length - 1; i >= 0; i--) {
        const node = walk[i]!;
        kernelInvariant(
          node.gradient !== undefined,
          () => `Cannot compute gradient: gradient function not found for ${node.kernelName}.`,
        );
        const dys = node.outputs.map((output) => gradientOf.get(output.id) ?? null);
        const inputGradients = node.gradient(dys);
        for (const [name, x] of Object.entries(node.inputs)) {
          const gradient = inputGradients[name];
          kernelInvariant(
            gradient !== undefined,
            () => `Cannot backprop through input ${name} of ${node.kernelName}.`,
          );
          // A fresh tensor object (sharing the data) even when the gradient function hands back
          // one it does not own (its dy, a saved tensor), so disposing below never frees a live one.
          const dx = tf.tidy(() => tf.clone(gradient()));
          kernelInvariant(
            dx.dtype === "float32" && tf.util.arraysEqual(dx.shape, x.shape),
            () => `gradient of ${node.kernelName} input ${name}: ${dx.dtype} [${dx.shape}] for [${x.shape}]`,
          );
          const current = gradientOf.get(x.id);
          const next = current === undefined ? dx : tf.add(current, dx);
          if (current !== undefined) {
            current.dispose();
            dx.dispose();
          }
          gradientOf.set(x.id, next);
        }
        // This node was the last user of its outputs' gradients and of its saved tensors.
        for (const output of node.outputs) {
          const dy = gradientOf.get(output.id);
          gradientOf.delete(output.id);
          dy?.dispose();
        }
        for (const saved of node.saved ?? []) saved.dispose();
      }
      const named: tf.NamedTensorMap = {};
      for (const variable of variables) {
        const gradient = gradientOf.get(variable.id);
        if (gradient !== undefined) named[variable.name] = gradient;
      }
      return named;
    });
    return { value: y as tf.Scalar, grads };
  } finally {
    for (const node of tape) for (const saved of node.saved ?? []) saved.dispose();
    engine.state.activeTape = null;
  }
};
