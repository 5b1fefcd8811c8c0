/**
 * Sinkhorn-Knopp: turns prototype scores into soft codes under the
 * equal-partition constraint (every prototype gets 1/K of the batch's mass).
 *
 * The reference (main_swav.py's `distributed_sinkhorn`) exponentiates
 * `scores / eps`, which overflows float32 below eps ≈ 0.0113. Here the same
 * iteration runs on log Q: each division by a row or column sum becomes the
 * subtraction of a logsumexp, which stays finite for any eps. The reference's
 * first global normalisation `Q /= sum(Q)` is kept (it is what the 0-iteration
 * case returns); for iterations ≥ 1 the first row normalisation would absorb it.
 *
 * On the wasm and cpu backends, where `dataSync` is a cheap copy, the codes
 * are computed on the host instead (`plainDomainCodes`): the same iteration in
 * float64 in the plain domain, which float64's range allows once the scores are
 * shifted by their maximum, as long as (max − min) / eps ≤ 600; beyond that (for
 * example eps 0.001 with scores spanning ±1) the log-domain tensor path runs.
 * Measured on wasm for one [64, 3000] score matrix (eps 0.05, 3 iterations), the
 * tensor path (~25 small kernels over 192k elements each, several of them
 * logsumexps) costs ~6.5 ms, the host path ~2.4 ms once V8 has optimised its
 * loops (~5.5 ms over the first ~40 calls of a process).
 *
 * Codes carry no gradient: the computation runs as the forward pass of a
 * `tf.customGrad` op whose gradient is zero, so none of its ops is recorded on
 * an active gradient tape, and calling it inside `tf.variableGrads` is safe.
 */
import * as tf from "@tensorflow/tfjs";
import { Effect, Schema, type Scope } from "effect";
import { markConstant } from "../backend/lean_gradients.ts";
import { wasmHeap } from "../backend/wasm_heap.ts";
import { scoped } from "../backend/resources.ts";
import { NonNegativeInt, Positive, withDefault } from "../models/schema.ts";
import { type CropLayout, CropLayoutError, inputProblem } from "./crop_layout.ts";
import { defineTensorStage } from "./stage.ts";

export interface SinkhornOptions {
  /** Entropic regularisation: smaller is sharper. The reference's default is 0.05. */
  readonly epsilon: number;
  /** Number of (row, column) normalisation pairs. The reference's default is 3. */
  readonly iterations: number;
}

/**
 * Runs `compute` on `inputs` with no gradient flowing back to them: inside a
 * gradient tape the result is a single op whose gradient is zero for every
 * input, and the ops inside `compute` are not recorded on the tape.
 */
export const withoutGradient = <T extends tf.Tensor>(
  compute: (...inputs: tf.Tensor[]) => T,
  inputs: readonly tf.Tensor[],
): T => {
  const op = tf.customGrad((...args: (tf.Tensor | tf.GradSaveFunc)[]) => {
    const tensors = args.slice(0, inputs.length) as tf.Tensor[];
    const out = compute(...tensors);
    // The forward runs in a tidy of its own: return a tensor that is not an input.
    const value = tensors.includes(out) ? out.clone() : out;
    return { value, gradFunc: () => tensors.map((t) => tf.zerosLike(t)) };
  });
  // Marked for the training step's gradient walk, which then skips it and what is computed from it.
  return markConstant(op(...inputs) as T);
};

/**
 * The log-domain iteration on scores [B, K], returning the codes. Laid out
 * [B, K], the reference's rows (prototypes, summed over samples) are our
 * columns (axis 0), and its columns (samples) our rows (axis 1).
 */
const logDomainCodes = (scores: tf.Tensor2D, { epsilon, iterations }: SinkhornOptions): tf.Tensor2D =>
  tf.tidy(() => {
    const [b, k] = scores.shape;
    const logB = Math.log(b);
    const logK = Math.log(k);
    let logQ: tf.Tensor2D = tf.div(scores.toFloat(), epsilon);
    logQ = tf.sub(logQ, tf.logSumExp(logQ));
    if (iterations === 0) return tf.exp(tf.add(logQ, logB));
    for (let i = 0; i < iterations; i++) {
      logQ = tf.sub(logQ, tf.add(tf.logSumExp(logQ, 0, true), logK));
      if (i < iterations - 1) logQ = tf.sub(logQ, tf.add(tf.logSumExp(logQ, 1, true), logB));
    }
    // The last sample normalisation followed by Q *= B is a softmax over each
    // row: computing it as one keeps the rows summing to 1 to float32 rounding,
    // where exp of entries of magnitude |s|/eps would be off by ~1e-5 at eps 0.001.
    return tf.softmax(logQ, 1);
  });

/**
 * Largest (max − min) / eps of the scores for which the plain-domain iteration
 * runs: the shifted kernel exp((s − max) / eps) then lies in [e^−600 ≈ 2.6e−261, 1],
 * far from float64's underflow (2.2e−308). Wider spreads go to the log domain.
 */
export const PLAIN_DOMAIN_MAX_SPREAD = 600;

/**
 * Bounds on every row and column sum of the plain-domain iteration: a sum
 * outside them (or NaN, from non-finite scores) means its scalings approach
 * float64's under- or overflow, and the caller falls back to the log domain.
 */
const MIN_SUM = 1e-290;
const MAX_SUM = 1e290;

/*
 * The host path's loops, one per function, over typed arrays, none allocating.
 * V8 optimises a long function with several hot loops by on-stack replacement
 * one loop at a time, deoptimising on leaving each (the code after it has no
 * type feedback yet): measured on [64, 3000], all loops in one function ran at
 * ~15 ms a call for the first ~12 calls, these small functions at ~5.5 ms for
 * the first ~40 (what a benchmark of a few steps sees), both ~2.4 ms after.
 */

/** Largest score, or −Infinity; NaN entries are skipped. */
const maxOf = (scores: ArrayLike<number>): number => {
  let max = -Infinity;
  // a conditional move: measured 3x faster here than an if-branch or Math.max
  for (let i = 0; i < scores.length; i++) max = scores[i]! > max ? scores[i]! : max;
  return max;
};

/** Smallest score, or Infinity; NaN entries are skipped. */
const minOf = (scores: ArrayLike<number>): number => {
  let min = Infinity;
  for (let i = 0; i < scores.length; i++) min = scores[i]! < min ? scores[i]! : min;
  return min;
};

/**
 * kernel = exp((scores − max) / epsilon), for (scores − max) / epsilon in
 * [−PLAIN_DOMAIN_MAX_SPREAD, 0]; returns the kernel's sum. Math.exp is most of
 * the host path's cost (~13 ns an element here, 2.7 ms of a [64, 3000] matrix);
 * a table-driven exponential was measured 2.5x faster, but saves only ~3 ms of
 * a ~300 ms training step, not worth a hand-written exp.
 */
const exponentiate = (
  kernel: Float64Array,
  scores: ArrayLike<number>,
  max: number,
  epsilon: number,
): number => {
  let total = 0;
  for (let i = 0; i < kernel.length; i++) {
    const e = Math.exp((scores[i]! - max) / epsilon);
    kernel[i] = e;
    total += e;
  }
  return total;
};

/** sums[j] = Σ_i kernel[i, j] · u[i], for kernel [u.length, sums.length], read row by row. */
const columnSums = (sums: Float64Array, kernel: Float64Array, u: Float64Array): void => {
  const k = sums.length;
  sums.fill(0);
  for (let r = 0; r < u.length; r++) {
    const ur = u[r]!;
    const base = r * k;
    for (let j = 0; j < k; j++) sums[j] += kernel[base + j]! * ur;
  }
};

/** Σ_j kernel[row, j] · v[j], for kernel [·, v.length]. */
const rowSum = (kernel: Float64Array, row: number, v: Float64Array): number => {
  const k = v.length;
  const base = row * k;
  let sum = 0;
  for (let j = 0; j < k; j++) sum += kernel[base + j]! * v[j]!;
  return sum;
};

/** out[row, j] = kernel[row, j] · v[j] · scale, rounded to float32. */
const writeRow = (
  out: Float32Array,
  kernel: Float64Array,
  row: number,
  v: Float64Array,
  scale: number,
): void => {
  const k = v.length;
  const base = row * k;
  for (let j = 0; j < k; j++) out[base + j] = kernel[base + j]! * v[j]! * scale;
};

/**
 * The kernel's storage, reused across calls: a fresh 1.5 MB array for [64, 3000]
 * on every call was measured to add up to ~13 ms on the benchmark machine in
 * runs of calls (fresh pages faulted in), five times the iteration itself.
 * Only kernels up to KEPT_KERNEL_ELEMENTS (16 MB) are kept for reuse; larger
 * ones (a long queue) are allocated per call, so the process never holds more.
 */
const KEPT_KERNEL_ELEMENTS = 1 << 21;
let kernelStorage = new Float64Array(0);
const kernelScratch = (n: number): Float64Array => {
  if (n > KEPT_KERNEL_ELEMENTS) return new Float64Array(n);
  if (kernelStorage.length < n) kernelStorage = new Float64Array(n);
  return kernelStorage.subarray(0, n);
};

/** A row or column sum the iteration may divide by (false for NaN). */
const usable = (sum: number): boolean => sum >= MIN_SUM && sum <= MAX_SUM;

/**
 * The Sinkhorn iteration on the host, in float64 and in the plain (exp)
 * domain, for scores laid out row-major [b, k]; the codes as float32 (written
 * into `out` when given), or
 * undefined when the plain domain could under- or overflow (the spread of the
 * scores exceeds `PLAIN_DOMAIN_MAX_SPREAD`·eps, a score is not finite, or an
 * intermediate sum leaves [1e−290, 1e290]) and the log-domain path must run.
 *
 * Q is kept as diag(u) · E · diag(v), with E = exp((s − max) / eps) fixed:
 * dividing the columns of Q by K times their sums sets v_j = 1 / (K Σ_i E_ij u_i),
 * dividing its rows by B times their sums sets u_i = 1 / (B Σ_j E_ij v_j), and the
 * global normalisation Q /= sum(Q) is u_i = 1 / sum(E). Each normalisation is
 * then one sequential read of E (a matrix-vector product), with no write, and the
 * final row normalisation to 1 (E_ij v_j / Σ_j E_ij v_j) writes the float32 codes.
 * Exact arithmetic gives the reference's values; float64 rounding is ~1e−15
 * relative, far below the float32 output's. The b·k exponentials are most of
 * the cost.
 */
export const plainDomainCodes = (
  scores: ArrayLike<number>,
  b: number,
  k: number,
  { epsilon, iterations }: SinkhornOptions,
  out: Float32Array = new Float32Array(b * k),
): Float32Array | undefined => {
  const n = b * k;
  if (n === 0 || scores.length !== n) return undefined;
  const max = maxOf(scores);
  // NaN scores are skipped by maxOf and minOf and caught by the sum checks; ±Infinity makes the spread infinite.
  if (!((max - minOf(scores)) / epsilon <= PLAIN_DOMAIN_MAX_SPREAD)) return undefined;

  const kernel = kernelScratch(n);
  const total = exponentiate(kernel, scores, max, epsilon); // ≥ 1: the maximum's entry is exp(0)
  if (!usable(total)) return undefined;
  const u = new Float64Array(b).fill(1 / total); // Q /= sum(Q)
  const v = new Float64Array(k).fill(1);
  // the reference returns Q · B
  if (iterations === 0) {
    for (let r = 0; r < b; r++) writeRow(out, kernel, r, v, u[r]! * b);
    return out;
  }

  const sums = new Float64Array(k);
  for (let it = 0; it < iterations; it++) {
    // Prototypes (columns): v_j = 1 / (K Σ_i E_ij u_i).
    columnSums(sums, kernel, u);
    for (let j = 0; j < k; j++) {
      if (!usable(sums[j]!)) return undefined;
      v[j] = 1 / (k * sums[j]!);
    }
    if (it === iterations - 1) break; // the last sample normalisation is the one to 1, below
    // Samples (rows): u_i = 1 / (B Σ_j E_ij v_j).
    for (let r = 0; r < b; r++) {
      const sum = rowSum(kernel, r, v);
      if (!usable(sum)) return undefined;
      u[r] = 1 / (b * sum);
    }
  }
  // The last sample normalisation then Q · B: each row divided by its sum (u_i cancels).
  for (let r = 0; r < b; r++) {
    const sum = rowSum(kernel, r, v);
    if (!usable(sum)) return undefined;
    writeRow(out, kernel, r, v, 1 / sum);
  }
  return out;
};

/**
 * The host path's codes as a tensor, or undefined (the log domain must run). On
 * wasm the scores are read and the codes written in place on the heap: copying
 * them out and back (dataSync, tf.tensor2d) left ~3 MB of garbage a training
 * step that V8 collects lazily, and the process's memory crept up by as much.
 */
const hostCodes = (scores: tf.Tensor2D, options: SinkhornOptions): tf.Tensor2D | undefined => {
  const [b, k] = scores.shape;
  const heap = wasmHeap();
  if (heap === undefined || scores.dtype !== "float32") {
    const codes = plainDomainCodes(scores.dataSync(), b, k, options);
    return codes === undefined ? undefined : tf.tensor2d(codes, [b, k]);
  }
  const outInfo = heap.output([b, k]); // first: allocating may move the heap under earlier views
  const out = heap.tensor<tf.Rank.R2>(outInfo);
  const written = plainDomainCodes(heap.view(scores), b, k, options, heap.view(outInfo));
  if (written !== undefined) return out;
  out.dispose();
  return undefined;
};

/** Backends whose synchronous reads and uploads are cheap copies in host memory. */
export const hostBackendActive = (): boolean => {
  const name = tf.getBackend();
  return name === "wasm" || name === "cpu";
};

/**
 * Which implementation runs: `auto` takes the host path on the wasm and cpu
 * backends (falling back to the tensor path where the plain domain could
 * underflow), the tensor path elsewhere; `tensor` always takes the log-domain
 * tensor path (for tests and comparisons).
 */
export type ComputePath = "auto" | "tensor";

/**
 * Codes [B, K] for scores [B, K] (queue rows, if any, first): each row sums to
 * 1 (for iterations ≥ 1), equal to the reference where the reference is finite,
 * finite for any positive epsilon. The result carries no gradient.
 */
export const sinkhornKnopp = (
  scores: tf.Tensor2D,
  options: SinkhornOptions,
  path: ComputePath = "auto",
): tf.Tensor2D => {
  if (scores.rank !== 2) throw new RangeError(`sinkhornKnopp: scores must be [B, K], got [${scores.shape}]`);
  if (!(options.epsilon > 0)) {
    throw new RangeError(`sinkhornKnopp: epsilon must be > 0, got ${options.epsilon}`);
  }
  if (!Number.isInteger(options.iterations) || options.iterations < 0) {
    throw new RangeError(`sinkhornKnopp: iterations must be an integer >= 0, got ${options.iterations}`);
  }
  return withoutGradient((s) => {
    if (path === "auto" && hostBackendActive()) {
      const codes = hostCodes(s as tf.Tensor2D, options);
      if (codes !== undefined) return codes;
    }
    return logDomainCodes(s as tf.Tensor2D, options);
  }, [scores]);
};

/** The sinkhorn stage's own settings, with the reference's defaults (the run config's `swav` section holds them). */
export const sinkhornFields = {
  /** Sinkhorn-Knopp entropic regularisation. */
  epsilon: withDefault(Positive, 0.05),
  /** Sinkhorn-Knopp iterations: (column, row) normalisation pairs. */
  sinkhornIterations: withDefault(NonNegativeInt, 3),
};
export const SinkhornConfig = Schema.Struct(sinkhornFields);
export type SinkhornConfig = typeof SinkhornConfig.Type;

export interface SinkhornInput {
  /**
   * Scores, read as constants. With `layout`, crop-major [bs·V, K] and one code
   * per assignment crop; without, one matrix [B, K] and one code.
   */
  readonly scores: tf.Tensor2D;
  readonly layout?: CropLayout | undefined;
  /** queueScores[i]: the queue's scores [queueLength, K] for cropsForAssign[i], prepended before Sinkhorn. */
  readonly queueScores?: readonly tf.Tensor2D[] | undefined;
}

/** Codes [bs, K] per assignment crop (queue rows prepended, dropped after); no layout checks. */
const assignmentCodesOf = (config: SinkhornConfig) => {
  const options = { epsilon: config.epsilon, iterations: config.sinkhornIterations };
  return ({ scores, layout, queueScores }: SinkhornInput): tf.Tensor2D[] => {
    if (layout === undefined) return [sinkhornKnopp(scores, options)];
    const { batchSize: bs, cropsForAssign } = layout;
    const k = scores.shape[1];
    return cropsForAssign.map((crop, i) => {
      const own = scores.slice([bs * crop, 0], [bs, k]) as tf.Tensor2D;
      const q = queueScores?.[i];
      if (q === undefined) return sinkhornKnopp(own, options);
      const withQueue = tf.concat([q, own], 0);
      return sinkhornKnopp(withQueue, options).slice([withQueue.shape[0] - bs, 0], [bs, k]);
    });
  };
};

/**
 * sinkhorn stage: detached scores (queue rows prepended per assignment crop) to
 * codes whose rows sum to 1, one per assignment crop. `apply` is meant for the
 * detached side of a training step (stages/tape.ts runs it off the tape); `run`
 * checks the layout and its codes are owned by the caller's scope.
 */
export const sinkhornStage = defineTensorStage<
  SinkhornInput,
  readonly tf.Tensor2D[],
  SinkhornConfig,
  CropLayoutError,
  Scope.Scope
>({
  name: "sinkhorn",
  config: SinkhornConfig,
  apply: assignmentCodesOf,
  run: (config) => (input) => {
    const problem = input.layout === undefined
      ? (input.scores.rank === 2 ? undefined : `scores must be [B, K], got [${input.scores.shape}]`)
      : inputProblem(input.layout, input.scores, input);
    return problem === undefined
      ? scoped(() => tf.tidy(() => assignmentCodesOf(config)(input)))
      : Effect.fail(new CropLayoutError({ message: problem }));
  },
});
