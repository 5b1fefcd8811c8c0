/**
 * The kernel settings: which accelerated kernels run and how, as one value.
 *
 * TF.js calls its registered kernels as global functions, with no context of
 * ours, so the kernels read the settings from one module-private holder. Only
 * the backend Layer writes it (`TensorBackend.layer(name, settings)` and
 * `TensorBackend.withSettings(settings)`, on acquisition, restoring the previous
 * value on release); everything else reads it through `activeKernelSettings()`.
 * The defaults are what every run uses; the other values exist for benchmarks
 * (before/after measurements) and for tests that compare kernels.
 */
import { Effect, Schema } from "effect";

/** Which accelerated kernels run and how, as one value; the defaults are what every run uses, the rest exist for benchmarks and kernel comparisons. */
export interface KernelSettings {
  /** OpenBLAS and oneDNN kernels on the wasm backend where they load (false: plain wasm kernels only). */
  readonly blas: boolean;
  /** Threads of OpenBLAS's and oneDNN's pools; undefined: `SWAV_THREADS`, else the core count. */
  readonly threads: number | undefined;
  /** Which OpenBLAS-backed kernels run (each falls back to the wasm kernel when off). */
  readonly blasConv2D: boolean;
  /** The OpenBLAS filter gradient of convolutions. */
  readonly blasConv2DBackpropFilter: boolean;
  /** The OpenBLAS input gradient of convolutions. */
  readonly blasConv2DBackpropInput: boolean;
  /** The OpenBLAS batched matrix product. */
  readonly blasBatchMatMul: boolean;
  /** Convolutions through oneDNN (libdnnl2) first, where it loads; im2col + OpenBLAS otherwise. */
  readonly dnnl: boolean;
  /**
   * How oneDNN convolutions take their weights: `any` lets oneDNN choose their
   * layout (its direct JIT kernels, the weights reordered on each call), `plain`
   * passes TF.js's HWIO as is (oneDNN then runs im2col + gemm, ~3x slower here).
   */
  readonly dnnlWeightsLayout: "any" | "plain";
  /** Training-mode batch norm (+ ReLU) through oneDNN where it loads; wasm tensor ops otherwise. */
  readonly nativeBatchNorm: boolean;
  /**
   * A residual block's relu(y + shortcut), its gradient, and large same-shape sums through oneDNN
   * where it loads (backend/elementwise_kernels.ts); the wasm backend's own kernels otherwise.
   */
  readonly nativeElementwise: boolean;
  /**
   * Conv2D and Conv2DBackpropInput use BLAS only where the column width
   * KH·KW·Ci is at least this (1x1 stride-1 convolutions, which need no column
   * buffer, always do): for thin inputs the JS im2col/col2im copies cost more
   * than XNNPACK's whole convolution. The filter gradient always gains.
   */
  readonly minColumns: number;
  /** Floats of im2col buffer per chunk. */
  readonly chunkFloats: number;
  /** false: tfjs-backend-wasm's own (naive loop) Conv2DBackpropInput instead of the polyphase one. */
  readonly fastConv2DBackpropInput: boolean;
  /** The training step's backward frees memory as it walks (`leanVariableGrads`) instead of `tf.variableGrads`. */
  readonly leanBackward: boolean;
  /**
   * Synchronised batch norm when the communicator has more than one rank: the
   * forward normalises with the statistics of the global batch (all ranks) and
   * the backward all-reduces the per-channel gradient sums, as PyTorch's
   * SyncBatchNorm. false: each rank normalises with its own batch's statistics.
   * A world of one is unaffected either way.
   * (The run config's `model.syncBatchNorm`.)
   */
  readonly syncBatchNorm: boolean;
  /**
   * The arithmetic of oneDNN's convolutions: `fp32`, or `bf16` (inputs rounded to bfloat16,
   * products accumulated in fp32; TF.js tensors stay fp32, and under `bf16Trunk` a ResNet's
   * activations between its layers are bf16 in native memory). Resolved already: a run's
   * `train.precision` of `auto` becomes one of these (backend/precision.ts).
   */
  readonly precision: "fp32" | "bf16";
  /**
   * Under bf16, a ResNet's residual blocks run as one op whose activations stay bf16 in native
   * memory (backend/bf16_trunk.ts) where oneDNN takes them; false: layer by layer on fp32 tensors.
   */
  readonly bf16Trunk: boolean;
}

/** What every run uses. */
export const defaultKernelSettings: KernelSettings = {
  blas: true,
  threads: undefined,
  blasConv2D: true,
  blasConv2DBackpropFilter: true,
  blasConv2DBackpropInput: true,
  blasBatchMatMul: true,
  dnnl: true,
  dnnlWeightsLayout: "any",
  nativeBatchNorm: true,
  nativeElementwise: true,
  minColumns: 256,
  chunkFloats: 1 << 22,
  fastConv2DBackpropInput: true,
  leanBackward: true,
  syncBatchNorm: true,
  precision: "fp32",
  bf16Trunk: true,
};

/** A kernel setting out of its range. */
export class KernelSettingsInvalid
  extends Schema.TaggedError<KernelSettingsInvalid>()("KernelSettingsInvalid", {
    setting: Schema.String,
    reason: Schema.String,
  }) {
  /** The setting and why it is invalid, on one line. */
  override get message(): string {
    return `kernel setting '${this.setting}' is invalid: ${this.reason}`;
  }
}

/** `overrides` on top of `base` (the defaults unless given), checked. */
export const makeKernelSettings = (
  overrides: Partial<KernelSettings> = {},
  base: KernelSettings = defaultKernelSettings,
): Effect.Effect<KernelSettings, KernelSettingsInvalid> => {
  const settings: KernelSettings = { ...base, ...overrides };
  const integer = (setting: keyof KernelSettings, value: number | undefined, least: number) =>
    value === undefined || (Number.isInteger(value) && value >= least)
      ? undefined
      : new KernelSettingsInvalid({ setting, reason: `must be an integer >= ${least}, got ${value}` });
  const invalid = integer("threads", settings.threads, 1) ??
    integer("minColumns", settings.minColumns, 0) ??
    integer("chunkFloats", settings.chunkFloats, 1) ??
    (settings.dnnlWeightsLayout === "any" || settings.dnnlWeightsLayout === "plain"
      ? undefined
      : new KernelSettingsInvalid({
        setting: "dnnlWeightsLayout",
        reason: `must be 'any' or 'plain', got ${settings.dnnlWeightsLayout}`,
      })) ??
    (settings.precision === "fp32" || settings.precision === "bf16" ? undefined : new KernelSettingsInvalid({
      setting: "precision",
      reason: `must be 'fp32' or 'bf16', got ${settings.precision}`,
    }));
  return invalid === undefined ? Effect.succeed(settings) : Effect.fail(invalid);
};

let active: KernelSettings = defaultKernelSettings;

/** The settings the kernels run with now (the defaults unless a backend Layer installed others). */
export const activeKernelSettings = (): KernelSettings => active;

/**
 * Makes `settings` the active ones and returns the ones they replace. Called
 * only by the backend Layer's acquisition and release (backend/tensor_backend.ts).
 */
export const installKernelSettings = (settings: KernelSettings): KernelSettings => {
  const previous = active;
  active = settings;
  return previous;
};

/** The thread count asked for: `SWAV_THREADS`, else the machine's core count. */
export const defaultThreads = (): number => {
  let env: string | undefined;
  try {
    env = Deno.env.get("SWAV_THREADS");
  } catch {
    env = undefined; // no --allow-env
  }
  const n = Number(env);
  if (env !== undefined && env !== "" && Number.isInteger(n) && n >= 1) return n;
  return Math.max(1, navigator.hardwareConcurrency ?? 1);
};

/**
 * The threads the native pools run with under the active settings, never more
 * than the cores: more only wait for each other, and OpenMP (libgomp, under
 * oneDNN) crashed asked for 100000. The command line warns when it caps.
 */
export const activeThreads = (): number =>
  Math.min(active.threads ?? defaultThreads(), Math.max(1, navigator.hardwareConcurrency ?? 1));
