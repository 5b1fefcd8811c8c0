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
import { Context, Effect, Layer, Schema } from "effect";
import { registerWasmKernels } from "./wasm_kernels.ts";

export const BackendName = Schema.Literals(["auto", "wasm", "cpu", "webgpu", "tensorflow"]);
export type BackendName = typeof BackendName.Type;
export const backendNames: readonly BackendName[] = ["auto", "wasm", "cpu", "webgpu", "tensorflow"];

/** A backend that cannot be used here; `reason` says why and `alternatives` what to use instead. */
export class BackendUnavailable extends Schema.TaggedError<BackendUnavailable>()("BackendUnavailable", {
  backend: Schema.String,
  reason: Schema.String,
  alternatives: Schema.Array(Schema.String),
}) {
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

const initWasm = async (): Promise<void> => {
  setWasmPaths(wasmDistFolder());
  registerWasmKernels();
  if (!(await tf.setBackend("wasm"))) throw new Error("tf.setBackend('wasm') failed");
};

const initWebGpu = async (): Promise<void> => {
  const adapter = await probeWebGpu();
  if (adapter === null) {
    throw new BackendUnavailable({
      backend: "webgpu",
      reason:
        "navigator.gpu found no adapter (on Linux install mesa-vulkan-drivers and libvulkan1 for a software one)",
      alternatives: ["wasm", "cpu"],
    });
  }
  if (!(await tf.setBackend("webgpu"))) throw new Error("tf.setBackend('webgpu') failed");
};

/** Module names tried, in order, for the `tensorflow` backend (not dependencies of this project). */
const nativeModules = ["@tensorflow/tfjs-node-gpu", "@tensorflow/tfjs-node"];

const initTensorflow = async (): Promise<void> => {
  const failures: string[] = [];
  for (const name of nativeModules) {
    try {
      // A computed specifier: nothing in the default path resolves or installs it.
      const specifier = name;
      await import(specifier);
      if (await tf.setBackend("tensorflow")) return;
      failures.push(`${name} loaded but did not register the 'tensorflow' backend`);
    } catch (error) {
      failures.push(`${name}: ${error instanceof Error ? error.message.split("\n")[0] : String(error)}`);
    }
  }
  throw new BackendUnavailable({
    backend: "tensorflow",
    reason: `neither native package loads (${failures.join("; ")}). ` +
      "Add one to deno.json imports where its libtensorflow download works",
    alternatives: ["wasm", "webgpu", "cpu"],
  });
};

/**
 * Initialises the requested backend and makes it the active one; returns the
 * name of the backend actually in use (for `auto`, `webgpu` or `wasm`).
 */
export const initBackend = async (requested: BackendName): Promise<Exclude<BackendName, "auto">> => {
  switch (requested) {
    case "auto": {
      if (autoBackend(await probeWebGpu()) === "webgpu") {
        await initWebGpu();
        return "webgpu";
      }
      await initWasm();
      return "wasm";
    }
    case "wasm":
      await initWasm();
      return "wasm";
    case "cpu":
      if (!(await tf.setBackend("cpu"))) throw new Error("tf.setBackend('cpu') failed");
      return "cpu";
    case "webgpu":
      await initWebGpu();
      return "webgpu";
    case "tensorflow":
      await initTensorflow();
      return "tensorflow";
  }
};

/** Reads `SWAV_BACKEND`, validated; undefined when unset. */
export const backendFromEnv = (): BackendName | undefined => {
  const value = Deno.env.get("SWAV_BACKEND");
  if (value === undefined || value === "") return undefined;
  if ((backendNames as readonly string[]).includes(value)) return value as BackendName;
  throw new BackendUnavailable({
    backend: value,
    reason: "SWAV_BACKEND names no known backend",
    alternatives: [...backendNames],
  });
};

/** The active tensor backend. */
export class TensorBackend extends Context.Service<TensorBackend, {
  /** What was asked for (`auto` included). */
  readonly requested: BackendName;
  /** What runs. */
  readonly name: Exclude<BackendName, "auto">;
}>()("swav-ts/backend/TensorBackend") {
  /**
   * Initialises `requested` (else `SWAV_BACKEND`, else `auto`) for the lifetime
   * of the layer. On release, every tf.Variable still registered is disposed and
   * the backend's queued work is flushed.
   */
  static readonly layer = (requested?: BackendName): Layer.Layer<TensorBackend, BackendUnavailable> =>
    Layer.effect(
      TensorBackend,
      Effect.acquireRelease(
        Effect.tryPromise({
          try: async () => {
            const choice = requested ?? backendFromEnv() ?? "auto";
            return TensorBackend.of({ requested: choice, name: await initBackend(choice) });
          },
          catch: (error) =>
            error instanceof BackendUnavailable ? error : new BackendUnavailable({
              backend: requested ?? "auto",
              reason: error instanceof Error ? error.message : String(error),
              alternatives: backendNames.filter((name) => name !== requested),
            }),
        }),
        () => Effect.sync(() => tf.disposeVariables()),
      ),
    );
}
