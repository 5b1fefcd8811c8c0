/**
 * The `TensorBackend` service: chooses, initialises and finalises the TF.js
 * backend. Every pipeline and CLI asks for it, so backend choice lives here only.
 *
 *   auto        webgpu where a real (non-fallback) adapter exists, else wasm
 *   wasm        the CPU path (XNNPACK), plus the kernels TF.js lacks there
 *   cpu         TF.js's plain JavaScript kernels (slow; for reference checks)
 *   webgpu      Deno's navigator.gpu; every read is asynchronous
 *   tensorflow  @tensorflow/tfjs-node-gpu or @tensorflow/tfjs-node, loaded only when asked for
 */
import * as tf from "@tensorflow/tfjs";
import { setWasmPaths } from "@tensorflow/tfjs-backend-wasm";
import "@tensorflow/tfjs-backend-webgpu";
import { Context, Effect, Layer, Schema, type Scope } from "effect";
import { registerBatchNormKernels } from "./batch_norm_kernels.ts";
import { registerElementwiseKernels } from "./elementwise_kernels.ts";
import {
  activeKernelSettings,
  activeThreads,
  defaultKernelSettings,
  installKernelSettings,
  type KernelSettings,
  type KernelSettingsInvalid,
  makeKernelSettings,
} from "./kernel_settings.ts";
import { registerNativeKernels } from "./native_kernels.ts";
import { setDnnlThreads } from "./onednn.ts";
import { setBlasThreads } from "./openblas.ts";
import { registerPlainWasmKernels } from "./wasm_kernels.ts";

export { defaultKernelSettings, type KernelSettings, KernelSettingsInvalid } from "./kernel_settings.ts";

/** The backends one can ask for, as a Schema (config files and `--backend` flags are decoded with it). */
export const BackendName: Schema.Literals<readonly ["auto", "wasm", "cpu", "webgpu", "tensorflow"]> = Schema
  .Literals(["auto", "wasm", "cpu", "webgpu", "tensorflow"]);
/** A backend name: "auto", "wasm", "cpu", "webgpu" or "tensorflow" (see the module's notes). */
export type BackendName = typeof BackendName.Type;
export const backendNames: readonly BackendName[] = ["auto", "wasm", "cpu", "webgpu", "tensorflow"];

/** A backend that cannot be used here; `reason` says why and `alternatives` what to use instead. */
export class BackendUnavailable extends Schema.TaggedError<BackendUnavailable>()("BackendUnavailable", {
  backend: Schema.String,
  reason: Schema.String,
  alternatives: Schema.Array(Schema.String),
}) {
  /** The backend, why it is unavailable and the alternatives, on one line. */
  override get message(): string {
    return `backend '${this.backend}' is unavailable: ${this.reason}. Alternatives: ${
      this.alternatives.join(", ")
    }`;
  }
}

/** The folder holding the wasm binaries of the installed tfjs-backend-wasm package. */
const wasmDistFolder = (): string => {
  const entry = import.meta.resolve("@tensorflow/tfjs-backend-wasm");
  const path = entry.startsWith("file://") ? new URL(entry).pathname : entry;
  return path.slice(0, path.lastIndexOf("/") + 1);
};

interface GpuAdapterLike {
  readonly info?: { readonly isFallbackAdapter?: boolean; readonly description?: string };
  readonly isFallbackAdapter?: boolean;
  readonly limits?: Record<string, number>;
}

/** The adapter limits that bound tensor sizes and kernels (for `deno task doctor`). */
const reportedLimits = ["maxBufferSize", "maxStorageBufferBindingSize", "maxComputeWorkgroupStorageSize"];

/** A WebGPU adapter as `auto` sees it. */
export interface WebGpuAdapter {
  readonly fallback: boolean;
  readonly description: string;
  readonly limits: Readonly<Record<string, number>>;
}

/** What `auto` picks given the adapter `probeWebGpu` found: webgpu on a real (non-fallback) adapter. */
export const autoBackend = (adapter: WebGpuAdapter | null): "webgpu" | "wasm" =>
  adapter !== null && !adapter.fallback ? "webgpu" : "wasm";

/** Describes the WebGPU adapter, or null when there is none. */
export const probeWebGpu = async (): Promise<WebGpuAdapter | null> => {
  const gpu = (globalThis.navigator as { gpu?: { requestAdapter(): Promise<GpuAdapterLike | null> } }).gpu;
  if (gpu === undefined) return null;
  // Mesa's Vulkan loader prints "XDG_RUNTIME_DIR is invalid or not set" on every adapter request
  // when the variable is unset (common in containers and CI); compute needs no display, so any
  // writable folder silences it.
  try {
    if (!Deno.env.get("XDG_RUNTIME_DIR")) Deno.env.set("XDG_RUNTIME_DIR", Deno.env.get("TMPDIR") ?? "/tmp");
  } catch {
    // No --allow-env: the message stays, nothing else changes.
  }
  try {
    const adapter = await gpu.requestAdapter();
    if (adapter === null) return null;
    const fallback = adapter.info?.isFallbackAdapter ?? adapter.isFallbackAdapter ?? false;
    const limits = Object.fromEntries(
      reportedLimits.flatMap((name) => {
        const value = adapter.limits?.[name];
        return typeof value === "number" ? [[name, value]] : [];
      }),
    );
    return { fallback, description: adapter.info?.description ?? "unknown adapter", limits };
  } catch {
    return null;
  }
};

/** `tf.setBackend(name)`, failing with BackendUnavailable when TF.js refuses it. */
const setBackend = (name: Exclude<BackendName, "auto">): Effect.Effect<void, BackendUnavailable> =>
  Effect.tryPromise({ try: () => tf.setBackend(name), catch: (error) => unavailable(name, error) }).pipe(
    Effect.flatMap((ok) =>
      ok ? Effect.void : Effect.fail(unavailable(name, `tf.setBackend('${name}') failed`))
    ),
  );

const unavailable = (backend: string, error: unknown): BackendUnavailable =>
  error instanceof BackendUnavailable ? error : new BackendUnavailable({
    backend,
    reason: error instanceof Error ? error.message : String(error),
    alternatives: backendNames.filter((name) => name !== backend && name !== "auto"),
  });

/**
 * The kernels on wasm, bottom up (each layer falls back to the one below): the
 * plain wasm kernels TF.js lacks, the OpenBLAS / oneDNN kernels, oneDNN batch norm and
 * element-wise sums.
 * Registered before `tf.setBackend("wasm")`, which runs the kernels' set-up functions.
 */
const initWasm: Effect.Effect<void, BackendUnavailable> = Effect.suspend(() => {
  setWasmPaths(wasmDistFolder());
  registerPlainWasmKernels();
  registerNativeKernels();
  registerBatchNormKernels();
  registerElementwiseKernels();
  return setBackend("wasm");
});

const initWebGpu: Effect.Effect<void, BackendUnavailable> = Effect.promise(probeWebGpu).pipe(
  Effect.flatMap((adapter) =>
    adapter === null
      ? Effect.fail(
        new BackendUnavailable({
          backend: "webgpu",
          reason:
            "navigator.gpu found no adapter (on Linux install mesa-vulkan-drivers and libvulkan1 for a software one)",
          alternatives: ["wasm", "cpu"],
        }),
      )
      : setBackend("webgpu")
  ),
);

/** Module names tried, in order, for the `tensorflow` backend (not dependencies of this project). */
const nativeModules = ["@tensorflow/tfjs-node-gpu", "@tensorflow/tfjs-node"];

const initTensorflow: Effect.Effect<void, BackendUnavailable> = Effect.gen(function* () {
  const failures: string[] = [];
  for (const name of nativeModules) {
    const failure = yield* Effect.promise(async () => {
      try {
        // A computed specifier: nothing in the default path resolves or installs it.
        const specifier = name;
        await import(specifier);
        if (await tf.setBackend("tensorflow")) return undefined;
        return `${name} loaded but did not register the 'tensorflow' backend`;
      } catch (error) {
        return `${name}: ${error instanceof Error ? error.message.split("\n")[0] : String(error)}`;
      }
    });
    if (failure === undefined) return;
    failures.push(failure);
  }
  return yield* Effect.fail(
    new BackendUnavailable({
      backend: "tensorflow",
      reason: `neither native package loads (${failures.join("; ")}). ` +
        "Add one to deno.json imports where its libtensorflow download works",
      alternatives: ["wasm", "webgpu", "cpu"],
    }),
  );
});

/**
 * Initialises the requested backend and makes it the active one; succeeds with
 * the name of the backend actually in use (for `auto`, `webgpu` or `wasm`).
 */
export const initBackendEffect = (
  requested: BackendName,
): Effect.Effect<Exclude<BackendName, "auto">, BackendUnavailable> => {
  switch (requested) {
    case "auto":
      return Effect.promise(probeWebGpu).pipe(
        Effect.flatMap((adapter) =>
          autoBackend(adapter) === "webgpu"
            ? Effect.as(initWebGpu, "webgpu" as const)
            : Effect.as(initWasm, "wasm" as const)
        ),
      );
    case "wasm":
      return Effect.as(initWasm, "wasm" as const);
    case "cpu":
      return Effect.as(setBackend("cpu"), "cpu" as const);
    case "webgpu":
      return Effect.as(initWebGpu, "webgpu" as const);
    case "tensorflow":
      return Effect.as(initTensorflow, "tensorflow" as const);
  }
};

/**
 * `initBackendEffect` as a promise, for plain-TypeScript callers (rejects with BackendUnavailable).
 *
 * @example The portable CPU backend for a script
 * ```ts
 * import * as tf from "@tensorflow/tfjs";
 * import assert from "node:assert/strict";
 * import { initBackend } from "@swav/swav-ts";
 *
 * assert.equal(await initBackend("wasm"), "wasm");
 * assert.equal(tf.getBackend(), "wasm");
 * ```
 */
export const initBackend = (requested: BackendName): Promise<Exclude<BackendName, "auto">> =>
  Effect.runPromise(initBackendEffect(requested));

/**
 * The backend to run: `flag` (an explicit choice) wins, then `SWAV_BACKEND`,
 * then `configured` (a run config's), else `auto`. Fails when `SWAV_BACKEND`
 * names no known backend.
 */
export const resolveBackendName = (
  flag?: BackendName,
  configured?: BackendName,
): Effect.Effect<BackendName, BackendUnavailable> =>
  Effect.suspend(() => {
    if (flag !== undefined) return Effect.succeed(flag);
    let value: string | undefined;
    try {
      value = Deno.env.get("SWAV_BACKEND");
    } catch {
      value = undefined; // no --allow-env: the variable cannot be set
    }
    if (value === undefined || value === "") return Effect.succeed(configured ?? "auto");
    if ((backendNames as readonly string[]).includes(value)) return Effect.succeed(value as BackendName);
    return Effect.fail(
      new BackendUnavailable({
        backend: value,
        reason: "SWAV_BACKEND names no known backend",
        alternatives: [...backendNames],
      }),
    );
  });

/**
 * Makes `overrides` on top of `base` the kernels' settings for the current scope (the native pools'
 * threads included), restoring the previous ones when the scope closes.
 */
const installSettings = (
  overrides: Partial<KernelSettings>,
  base: KernelSettings,
): Effect.Effect<KernelSettings, KernelSettingsInvalid, Scope.Scope> =>
  makeKernelSettings(overrides, base).pipe(
    Effect.flatMap((settings) =>
      Effect.acquireRelease(
        Effect.sync(() => {
          const previous = installKernelSettings(settings);
          applyThreads();
          return { settings, previous };
        }),
        ({ previous }) =>
          Effect.sync(() => {
            installKernelSettings(previous);
            applyThreads();
          }),
      )
    ),
    Effect.map(({ settings }) => settings),
  );

/** The active settings' thread count on whichever native library is loaded. */
const applyThreads = (): void => {
  const threads = activeThreads();
  setBlasThreads(threads);
  setDnnlThreads(threads);
};

/**
 * The active tensor backend.
 *
 * @example Provide the backend to a program; it is released when the program ends
 * ```ts
 * import { Effect } from "effect";
 * import assert from "node:assert/strict";
 * import { TensorBackend } from "@swav/swav-ts";
 *
 * const name = await Effect.runPromise(
 *   Effect.gen(function* () {
 *     const backend = yield* TensorBackend;
 *     return backend.name;
 *   }).pipe(Effect.provide(TensorBackend.layer("cpu"))),
 * );
 * assert.equal(name, "cpu");
 * ```
 */
export class TensorBackend extends Context.Service<TensorBackend, {
  /** What was asked for (`auto` included). */
  readonly requested: BackendName;
  /** What runs. */
  readonly name: Exclude<BackendName, "auto">;
  /** The kernel settings in force while this service is provided. */
  readonly settings: KernelSettings;
}>()("swav-ts/backend/TensorBackend") {
  /**
   * Initialises `requested` (a name, or an effect resolving one such as
   * `resolveBackendName(flag, configured)`; by default `SWAV_BACKEND`, else
   * `auto`) with the kernel `settings` (the defaults, overridden by the fields
   * given) for the lifetime of the layer. On release the previous kernel
   * settings come back, every tf.Variable still registered is disposed and the
   * backend's queued work is flushed.
   */
  static readonly layer = (
    requested?: BackendName | Effect.Effect<BackendName, BackendUnavailable>,
    settings: Partial<KernelSettings> = {},
  ): Layer.Layer<TensorBackend, BackendUnavailable | KernelSettingsInvalid> =>
    Layer.effect(
      TensorBackend,
      Effect.gen(function* () {
        const choice = Effect.isEffect(requested) ? yield* requested : yield* resolveBackendName(requested);
        yield* Effect.addFinalizer(() => Effect.sync(() => tf.disposeVariables()));
        const active = yield* installSettings(settings, defaultKernelSettings);
        const name = yield* initBackendEffect(choice);
        return TensorBackend.of({ requested: choice, name, settings: active });
      }),
    );

  /**
   * The fields of `settings` changed on top of the active kernel settings, for
   * the backend already running (one that `TensorBackend.layer` or
   * `initBackend` started) and the layer's lifetime: a bench's variant or a
   * test's comparison. Initialises and disposes nothing; the previous settings
   * come back on release.
   */
  static readonly withSettings = (
    settings: Partial<KernelSettings>,
  ): Layer.Layer<TensorBackend, KernelSettingsInvalid> =>
    Layer.effect(
      TensorBackend,
      Effect.gen(function* () {
        const active = yield* installSettings(settings, activeKernelSettings());
        const name = tf.getBackend() as Exclude<BackendName, "auto">;
        return TensorBackend.of({ requested: name, name, settings: active });
      }),
    );
}

/**
 * Runs `f` with `settings` installed by `TensorBackend.withSettings`, for
 * plain-TypeScript callers (benches, tests); rejects with `f`'s error or KernelSettingsInvalid.
 */
export const withKernelSettings = <T>(settings: Partial<KernelSettings>, f: () => Promise<T>): Promise<T> =>
  Effect.runPromise(
    Effect.tryPromise({ try: f, catch: (error) => error }).pipe(
      Effect.provide(TensorBackend.withSettings(settings)),
    ),
  );

/** The settings the kernels run with now: what `TensorBackend` provides, for code outside Effect. */
export { activeKernelSettings };
