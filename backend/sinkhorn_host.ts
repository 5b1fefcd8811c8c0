/**
 * The host-side Sinkhorn kernel: the iteration in float64 in the plain (exp)
 * domain on the scores' values, for the wasm and cpu backends, where
 * `dataSync` is a cheap copy (and on wasm the scores are read, and the codes
 * written, in place on the heap). The sinkhorn stage (`stages/sinkhorn.ts`)
 * takes it where `hostBackendActive()` and falls back to its log-domain tensor
 * path where this returns undefined.
 */
import * as tf from "@tensorflow/tfjs";
import { activeCommunicator, type Communicator } from "./communicator.ts";
import { wasmHeap } from "./wasm_heap.ts";

export interface SinkhornOptions {
  /** Entropic regularisation: smaller is sharper. The reference's default is 0.05. */
  readonly epsilon: number;
  /** Number of (row, column) normalisation pairs. The reference's default is 3. */
  readonly iterations: number;
}

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
 *
 * With a `world` of several ranks, each holding its own b rows of one matrix
 * of b·size rows, this is the reference's `distributed_sinkhorn`: B is b·size,
 * and the maximum (with the minimum, for the spread check), the total and the
 * prototype (column) sums are all-reduced in float64, so every rank returns its
 * rows of the codes of the whole matrix. Every rank takes the same branch: the
 * checks read all-reduced values, and a rank whose own row sum is unusable
 * poisons the next all-reduced column sums with NaN (or, after the last
 * iteration, one all-reduced flag), so all fall back to the log domain together.
 */
export const plainDomainCodes = (
  scores: ArrayLike<number>,
  b: number,
  k: number,
  { epsilon, iterations }: SinkhornOptions,
  out: Float32Array = new Float32Array(b * k),
  world: Communicator = activeCommunicator(),
): Float32Array | undefined => {
  const n = b * k;
  if (n === 0 || scores.length !== n) return undefined;
  const distributed = world.size > 1;
  const batch = b * world.size; // the reference's B = Q.shape[1] · world_size
  let max = maxOf(scores);
  let min = minOf(scores);
  if (distributed) {
    const extremes = Float64Array.of(max, -min);
    world.allReduce(extremes, "max");
    max = extremes[0]!;
    min = -extremes[1]!;
  }
  // NaN scores are skipped by maxOf and minOf and caught by the sum checks; ±Infinity makes the spread infinite.
  if (!((max - min) / epsilon <= PLAIN_DOMAIN_MAX_SPREAD)) return undefined;

  const kernel = kernelScratch(n);
  let total = exponentiate(kernel, scores, max, epsilon); // ≥ 1: the maximum's entry is exp(0)
  if (distributed) {
    const sum = Float64Array.of(total);
    world.allReduce(sum, "sum");
    total = sum[0]!;
  }
  if (!usable(total)) return undefined;
  const u = new Float64Array(b).fill(1 / total); // Q /= sum(Q)
  const v = new Float64Array(k).fill(1);
  // the reference returns Q · B
  if (iterations === 0) {
    for (let r = 0; r < b; r++) writeRow(out, kernel, r, v, u[r]! * batch);
    return out;
  }

  const sums = new Float64Array(k);
  for (let it = 0; it < iterations; it++) {
    // Prototypes (columns): v_j = 1 / (K Σ_i E_ij u_i), the sum over every rank's rows.
    columnSums(sums, kernel, u);
    if (distributed) world.allReduce(sums, "sum");
    for (let j = 0; j < k; j++) {
      if (!usable(sums[j]!)) return undefined;
      v[j] = 1 / (k * sums[j]!);
    }
    if (it === iterations - 1) break; // the last sample normalisation is the one to 1, below
    // Samples (rows): u_i = 1 / (B Σ_j E_ij v_j).
    for (let r = 0; r < b; r++) {
      const sum = rowSum(kernel, r, v);
      if (usable(sum)) u[r] = 1 / (batch * sum);
      else if (distributed) u[r] = NaN; // makes every rank's next column sums NaN
      else return undefined;
    }
  }
  // The last sample normalisation then Q · B: each row divided by its sum (u_i cancels).
  let unusable = 0;
  for (let r = 0; r < b; r++) {
    const sum = rowSum(kernel, r, v);
    if (usable(sum)) writeRow(out, kernel, r, v, 1 / sum);
    else if (distributed) unusable = 1;
    else return undefined;
  }
  if (distributed) {
    const flag = Float64Array.of(unusable);
    world.allReduce(flag, "max");
    if (flag[0] !== 0) return undefined;
  }
  return out;
};

/**
 * The host path's codes as a tensor, or undefined (the log domain must run). On
 * wasm the scores are read and the codes written in place on the heap: copying
 * them out and back (dataSync, tf.tensor2d) left ~3 MB of garbage a training
 * step that V8 collects lazily, and the process's memory crept up by as much.
 */
export const hostCodes = (scores: tf.Tensor2D, options: SinkhornOptions): tf.Tensor2D | undefined => {
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
