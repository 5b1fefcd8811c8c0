/**
 * The kernel settings: one value provided through the backend Layer, checked,
 * visible on the service and to the kernels, and restored when the layer ends.
 */
import assert from "node:assert/strict";
import { Effect, Exit } from "effect";
import {
  activeKernelSettings,
  defaultKernelSettings,
  makeKernelSettings,
} from "../backend/kernel_settings.ts";
import {
  BackendUnavailable,
  KernelSettingsInvalid,
  resolveBackendName,
  TensorBackend,
  withKernelSettings,
} from "../backend/tensor_backend.ts";

Deno.test("makeKernelSettings fills the defaults and rejects values out of range", async () => {
  const settings = await Effect.runPromise(makeKernelSettings({ leanBackward: false }));
  assert.deepEqual(settings, { ...defaultKernelSettings, leanBackward: false });
  for (const bad of [{ threads: 0 }, { threads: 1.5 }, { chunkFloats: 0 }, { minColumns: -1 }]) {
    const exit = await Effect.runPromiseExit(makeKernelSettings(bad));
    assert.ok(Exit.isFailure(exit), JSON.stringify(bad));
    const error = await Effect.runPromise(Effect.flip(makeKernelSettings(bad)));
    assert.ok(error instanceof KernelSettingsInvalid);
    assert.equal(error.setting, Object.keys(bad)[0]);
  }
});

Deno.test("TensorBackend.layer provides its settings, and the previous ones come back on release", async () => {
  assert.deepEqual(activeKernelSettings(), defaultKernelSettings);
  const seen = await Effect.runPromise(
    Effect.gen(function* () {
      const backend = yield* TensorBackend;
      const outer = { service: backend.settings, active: activeKernelSettings() };
      const inner = yield* Effect.provide(
        Effect.gen(function* () {
          return { service: (yield* TensorBackend).settings, active: activeKernelSettings() };
        }),
        TensorBackend.withSettings({ nativeBatchNorm: false }),
      );
      return { outer, inner, afterInner: activeKernelSettings() };
    }).pipe(Effect.provide(TensorBackend.layer("cpu", { leanBackward: false, threads: 2 }))),
  );
  assert.equal(seen.outer.service.leanBackward, false);
  assert.equal(seen.outer.service.threads, 2);
  assert.equal(seen.outer.active, seen.outer.service);
  // withSettings changes only the fields it names, on top of the layer's.
  assert.deepEqual(seen.inner.service, { ...seen.outer.service, nativeBatchNorm: false });
  assert.equal(seen.inner.active, seen.inner.service);
  assert.equal(seen.afterInner, seen.outer.service);
  assert.deepEqual(activeKernelSettings(), defaultKernelSettings);
});

Deno.test("invalid settings fail the layer with KernelSettingsInvalid and change nothing", async () => {
  const error = await Effect.runPromise(
    Effect.flip(Effect.provide(Effect.service(TensorBackend), TensorBackend.layer("cpu", { threads: 0 }))),
  );
  assert.ok(error instanceof KernelSettingsInvalid);
  assert.deepEqual(activeKernelSettings(), defaultKernelSettings);
  await assert.rejects(withKernelSettings({ chunkFloats: -3 }, () => Promise.resolve(1)));
  assert.equal(
    await withKernelSettings({ minColumns: 0 }, () => Promise.resolve(activeKernelSettings().minColumns)),
    0,
  );
  assert.deepEqual(activeKernelSettings(), defaultKernelSettings);
});

Deno.test("resolveBackendName: the flag, then SWAV_BACKEND, then the configured backend", async () => {
  const saved = Deno.env.get("SWAV_BACKEND");
  try {
    Deno.env.set("SWAV_BACKEND", "cpu");
    assert.equal(await Effect.runPromise(resolveBackendName("wasm", "webgpu")), "wasm");
    assert.equal(await Effect.runPromise(resolveBackendName(undefined, "webgpu")), "cpu");
    Deno.env.delete("SWAV_BACKEND");
    assert.equal(await Effect.runPromise(resolveBackendName(undefined, "webgpu")), "webgpu");
    assert.equal(await Effect.runPromise(resolveBackendName()), "auto");
    Deno.env.set("SWAV_BACKEND", "gpu9000");
    const error = await Effect.runPromise(Effect.flip(resolveBackendName(undefined, "cpu")));
    assert.ok(error instanceof BackendUnavailable);
    assert.equal(error.backend, "gpu9000");
  } finally {
    if (saved === undefined) Deno.env.delete("SWAV_BACKEND");
    else Deno.env.set("SWAV_BACKEND", saved);
  }
});
