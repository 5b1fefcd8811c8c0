/**
 * Tensor ownership. `tf.tidy` covers synchronous maths only; a tensor that
 * crosses an `await` or a stage boundary is owned by an Effect scope and
 * disposed by its finalizer, on success, failure and interruption alike.
 */
import * as tf from "@tensorflow/tfjs";
import { Effect, type Scope } from "effect";
import type { Tensor } from "./tensor_types.ts";

/** Anything that holds tensors: a tensor, an array or record of them, or nested ones. */
export type TensorContainer =
  | Tensor
  | readonly TensorContainer[]
  | { readonly [key: string]: TensorContainer }
  | null
  | undefined;

/**
 * Disposes every tensor reachable from `value` through arrays and plain object
 * fields (already disposed ones are skipped); other values are left alone.
 */
export const disposeAll = (value: unknown): void => {
  if (value == null || typeof value !== "object") return;
  if (value instanceof tf.Tensor) {
    if (!value.isDisposed) value.dispose();
    return;
  }
  if (Array.isArray(value)) {
    for (const item of value) disposeAll(item);
    return;
  }
  for (const item of Object.values(value)) disposeAll(item);
};

/**
 * Acquires tensors with `make` and ties their disposal to the current scope.
 *
 * @example Tensors made inside a scope are gone when it closes
 * ```ts
 * import * as tf from "@tensorflow/tfjs";
 * import { Effect } from "effect";
 * import assert from "node:assert/strict";
 * import { initBackend, liveTensors, scoped } from "@swav/swav-ts";
 *
 * await initBackend("cpu");
 * const before = liveTensors().tensors;
 * const sum = await Effect.runPromise(Effect.scoped(Effect.gen(function* () {
 *   const [a, b] = yield* scoped(() => [tf.ones([2, 2]), tf.ones([2, 2])]);
 *   // tf.tidy frees the intermediate sum a + b; scoped owns only the result
 *   const total = yield* scoped(() => tf.tidy(() => tf.add(a!, b!).sum()));
 *   return (yield* Effect.promise(() => total.data()))[0];
 * })));
 * assert.equal(sum, 8);
 * assert.equal(liveTensors().tensors, before); // no leak
 * ```
 */
export const scoped = <T>(make: () => T): Effect.Effect<T, never, Scope.Scope> =>
  Effect.acquireRelease(Effect.sync(make), (value) => Effect.sync(() => disposeAll(value)));

/** Like `scoped`, for an asynchronous producer (for example an upload to the GPU). */
export const scopedPromise = <T>(
  make: () => Promise<T>,
): Effect.Effect<T, never, Scope.Scope> =>
  Effect.acquireRelease(Effect.promise(make), (value) => Effect.sync(() => disposeAll(value)));

/** Live tensor count and bytes of the active backend. */
export const liveTensors = (): { readonly tensors: number; readonly bytes: number } => {
  const memory = tf.memory();
  return { tensors: memory.numTensors, bytes: memory.numBytes };
};
