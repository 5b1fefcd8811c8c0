/**
 * Exports PyTorch and ONNX tools load: safetensors into torch (reference/interop_check.py with
 * Debian's /usr/bin/python3 and python3-torch; ignored where absent, test/_optional.ts), ONNX
 * through onnx.checker (python3-onnx), and runs under ONNX Runtime (onnxruntime-node's CPU
 * binary, which ships in its npm tarball: an npm dependency, so not optional). Tolerance: norm-wise relative 1e-4 against torch float64 or our forward.
 */
import * as tf from "@tensorflow/tfjs";
import assert from "node:assert/strict";
import { Effect } from "effect";
import { initBackend } from "../backend/tensor_backend.ts";
import { makeSwavModel, modelForward } from "../models/model.ts";
import { backboneForward } from "../models/resnet.ts";
import { loadWeightsFile, scopedModelFromWeights } from "../pipelines/torch_weights.ts";
import { encodeSafetensors, exportSafetensors } from "../pipelines/export_safetensors.ts";
import { exportOnnx, ONNX_OPSET, onnxModelBytes } from "../pipelines/export_onnx.ts";
import { relativeError, values } from "./_helpers.ts";
import { optionalTest, PYTHON } from "./_optional.ts";

await initBackend("wasm");

const TOL = 1e-4;
const dir = new URL("./fixtures/torch/", import.meta.url).pathname;
const script = new URL("../reference/interop_check.py", import.meta.url).pathname;
const expected = JSON.parse(await Deno.readTextFile(`${dir}expected.json`));

// The native module loads through Deno's Node-API support; its install script (CUDA providers from
// NuGet) is never run, and the CPU provider needs nothing beyond the npm tarball.
type Ort = typeof import("onnxruntime-node");
const loadOrt = async (): Promise<Ort | string> => {
  try {
    // Importing requires the .node binding, which links libonnxruntime.so.
    return await import("onnxruntime-node");
  } catch (error) {
    return `onnxruntime-node does not load: ${error instanceof Error ? error.message : String(error)}`;
  }
};
const ort = await loadOrt();
// ONNX Runtime leaves an empty `mat-debug-<pid>.log` in the temporary folder once loaded: remove ours.
globalThis.addEventListener("unload", () => {
  const log = `${Deno.env.get("TMPDIR") ?? "/tmp"}/mat-debug-${Deno.pid}.log`;
  try {
    if (Deno.statSync(log).size === 0) Deno.removeSync(log);
  } catch {
    // not written
  }
});

const runPython = async (...args: string[]) => {
  const out = await new Deno.Command(PYTHON, { args: [script, ...args] }).output();
  const text = new TextDecoder().decode(out.stdout);
  assert.ok(out.success, `interop_check.py ${args[0]} failed: ${new TextDecoder().decode(out.stderr)}`);
  return JSON.parse(text);
};

Deno.test("safetensors: header, F32, torch names and layouts", () => {
  const bytes = encodeSafetensors([{ name: "a.weight", shape: [2, 1, 1, 1], values: Float32Array.of(1, 2) }]);
  const n = Number(new DataView(bytes.buffer).getBigUint64(0, true));
  assert.equal((8 + n) % 8, 0);
  const header = JSON.parse(new TextDecoder().decode(bytes.subarray(8, 8 + n)));
  assert.deepEqual(header["a.weight"], { dtype: "F32", shape: [2, 1, 1, 1], data_offsets: [0, 8] });
  assert.deepEqual(new Float32Array(bytes.slice(8 + n).buffer), Float32Array.of(1, 2));
});

for (const name of ["resnet18", "resnet50"]) {
  optionalTest(
    `${name} from a .pth, exported as safetensors with head, loads in torch with the same outputs`,
    ["torch"],
    async () => {
      const e = expected[name];
      const tmp = await Deno.makeTempDir();
      try {
        await Effect.runPromise(Effect.scoped(Effect.gen(function* () {
          const model = yield* scopedModelFromWeights(yield* loadWeightsFile(`${dir}${name}.pth`));
          yield* exportSafetensors(model, `${tmp}/m.safetensors`, { head: true });
        })));
        await Deno.writeTextFile(`${tmp}/input.json`, JSON.stringify(e));
        const config = { ...e.config, in_channels: 3 };
        delete config.inputChannels;
        const torch = await runPython(
          "safetensors",
          `${tmp}/m.safetensors`,
          JSON.stringify(config),
          `${tmp}/input.json`,
        );
        assert.ok(relativeError(torch.features, e.features) < TOL);
        assert.ok(relativeError(torch.scores, e.scores) < TOL);
      } finally {
        await Deno.remove(tmp, { recursive: true });
      }
    },
  );
}

optionalTest(
  "a width-64 ResNet-18 backbone loads strictly into torchvision's resnet18 (fc = Identity)",
  ["torch", "torchvision"],
  async () => {
    const tmp = await Deno.makeTempDir();
    using model = makeSwavModel({
      arch: "resnet18",
      width: 64,
      inputChannels: 3,
      stem: "imagenet",
      hidden: 0,
      out: 8,
      prototypes: 4,
      syncBatchNorm: true,
    }, 5);
    try {
      await Effect.runPromise(exportSafetensors(model, `${tmp}/r18.safetensors`));
      const input = Array.from({ length: 2 * 48 * 48 * 3 }, (_, i) => Math.sin(i * 0.37));
      const x = tf.tensor4d(input, [2, 48, 48, 3]);
      const features = backboneForward(model.plan, model.param, x, { training: false });
      const ours = await values(features);
      tf.dispose([x, features]);
      await Deno.writeTextFile(`${tmp}/input.json`, JSON.stringify({ input, inputShape: [2, 48, 48, 3] }));
      const torch = await runPython(
        "safetensors",
        `${tmp}/r18.safetensors`,
        '"torchvision:resnet18"',
        `${tmp}/input.json`,
      );
      const error = relativeError(ours, torch.features);
      assert.ok(error < TOL, `relative error ${error}`);
    } finally {
      await Deno.remove(tmp, { recursive: true });
    }
  },
);

optionalTest(
  "the ONNX export (backbone, head + prototypes) passes onnx.checker",
  ["torch", "onnx"],
  async () => {
    const tmp = await Deno.makeTempDir();
    try {
      for (const head of [false, true]) {
        await Effect.runPromise(Effect.scoped(Effect.gen(function* () {
          const model = yield* scopedModelFromWeights(yield* loadWeightsFile(`${dir}resnet50.pth`));
          yield* exportOnnx(model, `${tmp}/m.onnx`, { head });
        })));
        const report = await runPython("onnx", `${tmp}/m.onnx`);
        assert.deepEqual(report, {
          ok: true,
          opset: ONNX_OPSET,
          outputs: head ? ["features", "embeddings", "scores"] : ["features"],
        });
      }
    } finally {
      await Deno.remove(tmp, { recursive: true });
    }
  },
);

for (const name of ["resnet18", "resnet50"]) {
  Deno.test({
    name: `${name}'s ONNX export with head runs under ONNX Runtime with our eval-mode outputs`,
    fn: async () => {
      // onnxruntime-node comes with `npm ci` (its CPU binary is in the tarball): a failure here is real.
      assert.ok(typeof ort !== "string", ort as string);
      const e = expected[name];
      const [n, h, w, c] = e.inputShape as number[];
      const { bytes, ours } = await Effect.runPromise(Effect.scoped(Effect.gen(function* () {
        const model = yield* scopedModelFromWeights(yield* loadWeightsFile(`${dir}${name}.pth`));
        const bytes = yield* onnxModelBytes(model, { head: true });
        const x = tf.tensor4d(e.input, [n!, h!, w!, c!]);
        const out = modelForward(model, [x], { training: false });
        const ours = {
          features: yield* Effect.promise(() => values(out.features)),
          embeddings: yield* Effect.promise(() => values(out.embeddings)),
          scores: yield* Effect.promise(() => values(out.scores!)),
        };
        tf.dispose([x, out.features, out.embeddings, out.scores]);
        return { bytes, ours };
      })));
      // NHWC -> NCHW, torch's layout.
      const nchw = new Float32Array(n! * c! * h! * w!);
      for (let b = 0; b < n!; b++) {
        for (let y = 0; y < h!; y++) {
          for (let x = 0; x < w!; x++) {
            for (let k = 0; k < c!; k++) {
              nchw[((b * c! + k) * h! + y) * w! + x] = e.input[((b * h! + y) * w! + x) * c! + k];
            }
          }
        }
      }
      const session = await ort.InferenceSession.create(bytes);
      try {
        const result = await session.run({ images: new ort.Tensor("float32", nchw, [n!, c!, h!, w!]) });
        for (const output of ["features", "embeddings", "scores"] as const) {
          const got = result[output]!;
          assert.equal(got.dims[0], n);
          const error = relativeError(got.data as Float32Array, ours[output]);
          assert.ok(error < TOL, `${output}: relative error ${error}`);
        }
      } finally {
        await session.release();
      }
    },
  });
}
