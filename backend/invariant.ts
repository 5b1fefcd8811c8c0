/**
 * The one way synchronous tensor code in backend/ fails: TF.js kernel
 * functions, gradient functions and the gradient-tape walk run inside the TF.js
 * engine, which calls them synchronously and expects a tensor back, so they
 * have no error channel. Everything reachable from an Effect (backend
 * initialisation, library loading, settings) fails through Effect's error
 * channel with a tagged error instead.
 */

/** A broken precondition inside a kernel, a gradient function or another synchronous tensor op. */
export class KernelInvariantError extends Error {
  readonly _tag = "KernelInvariantError";
  override readonly name = "KernelInvariantError";
}

/** Throws `KernelInvariantError(message())` unless `condition` holds. */
export function kernelInvariant(condition: unknown, message: () => string): asserts condition {
  // A throw: the callers run synchronously inside the TF.js engine (see above), which reports failures by throwing.
  if (!condition) throw new KernelInvariantError(message());
}
