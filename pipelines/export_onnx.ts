/**
 * Export to ONNX (opset 13, IR version 7): the backbone, and optionally the projection head
 * and prototypes, as a graph ONNX Runtime runs. Written with the `onnx-proto` package (the
 * ONNX protobuf definitions compiled for protobufjs).
 *
 * Inputs are torch's: `images` float32 [N, C, H, W] (NCHW), batch and size dynamic, normalised
 * as the model was trained. Outputs: `features` [N, featureDim] (global average pool of the
 * last stage), and with the head `embeddings` [N, out] (unit L2 norm, F.normalize's 1e-12
 * floor) and `scores` [N, K] (embeddings · prototypesᵀ). BatchNorm in inference form (running
 * statistics, eps 1e-5); weights in torch layouts.
 */
import { Effect } from "effect";
import onnxProto from "onnx-proto";
import { reasonOf } from "../data/errors.ts";
import type { SwavModel } from "../models/model.ts";
import { BN_EPS } from "../models/resnet.ts";
import { ExportError, torchArrays } from "./export_safetensors.ts";
import { writeFileAtomic } from "./atomic_write.ts";

const { onnx } = onnxProto;

export const ONNX_OPSET = 13;
const IR_VERSION = 7;
const FLOAT = 1; // TensorProto.DataType.FLOAT
const NORM_FLOOR = 1e-12;

type Attribute = { name: string; type: number; i?: number; ints?: number[]; f?: number };
const ints = (name: string, values: number[]): Attribute => ({ name, type: 7, ints: values });
const int = (name: string, value: number): Attribute => ({ name, type: 2, i: value });
const float = (name: string, value: number): Attribute => ({ name, type: 1, f: value });

/** The ONNX graph of the model; `head` adds the projection head and prototypes. */
export const onnxModelBytes = (model: SwavModel, options: { head?: boolean } = {}) =>
  Effect.gen(function* () {
    // Our names with the backbone. prefix, torch layouts.
    const arrays = yield* torchArrays(model, { head: options.head ?? false, backbonePrefix: true });
    const initializer = arrays.map((a) => ({
      name: a.name,
      dims: a.shape,
      dataType: FLOAT,
      rawData: new Uint8Array(a.values.buffer, a.values.byteOffset, a.values.byteLength),
    }));
    const nodes: {
      opType: string;
      input: string[];
      output: string[];
      name: string;
      attribute?: Attribute[];
    }[] = [];
    let counter = 0;
    const node = (opType: string, input: string[], attribute: Attribute[] = [], output?: string) => {
      const name = output ?? `${opType.toLowerCase()}_${counter++}`;
      nodes.push({ opType, input, output: [name], name, attribute });
      return name;
    };
    const constant = (name: string, value: number) => {
      initializer.push({
        name,
        dims: [],
        dataType: FLOAT,
        rawData: new Uint8Array(Float32Array.of(value).buffer),
      });
      return name;
    };
    const conv = (x: string, weight: string, kernel: number, stride: number, pad: number) =>
      node("Conv", [x, weight], [
        ints("kernel_shape", [kernel, kernel]),
        ints("strides", [stride, stride]),
        ints("pads", [pad, pad, pad, pad]),
      ]);
    const bn = (x: string, prefix: string) =>
      node("BatchNormalization", [
        x,
        `${prefix}.weight`,
        `${prefix}.bias`,
        `${prefix}.running_mean`,
        `${prefix}.running_var`,
      ], [float("epsilon", BN_EPS)]);
    const relu = (x: string) => node("Relu", [x]);

    const plan = model.plan;
    let y = relu(
      bn(
        conv("images", "backbone.conv1.weight", plan.stemKernel, plan.stemStride, plan.stemPad),
        "backbone.bn1",
      ),
    );
    if (plan.maxPool) {
      y = node("MaxPool", [y], [
        ints("kernel_shape", [3, 3]),
        ints("strides", [2, 2]),
        ints("pads", [1, 1, 1, 1]),
      ]);
    }
    for (const b of plan.blocks) {
      const p = b.prefix;
      let z: string;
      if (b.kind === "basic") {
        z = relu(bn(conv(y, `${p}.conv1.weight`, 3, b.stride, 1), `${p}.bn1`));
        z = bn(conv(z, `${p}.conv2.weight`, 3, 1, 1), `${p}.bn2`);
      } else {
        z = relu(bn(conv(y, `${p}.conv1.weight`, 1, 1, 0), `${p}.bn1`));
        z = relu(bn(conv(z, `${p}.conv2.weight`, 3, b.stride, 1), `${p}.bn2`));
        z = bn(conv(z, `${p}.conv3.weight`, 1, 1, 0), `${p}.bn3`);
      }
      const shortcut = b.downsample
        ? bn(conv(y, `${p}.downsample.0.weight`, 1, b.stride, 0), `${p}.downsample.1`)
        : y;
      y = relu(node("Add", [z, shortcut]));
    }
    node("Flatten", [node("GlobalAveragePool", [y])], [int("axis", 1)], "features");
    const batch = { dimParam: "N" };
    const output = (name: string, width: number) => ({
      name,
      type: { tensorType: { elemType: FLOAT, shape: { dim: [batch, { dimValue: width }] } } },
    });
    const outputs = [output("features", plan.featureDim)];
    if (options.head) {
      const gemm = (x: string, prefix: string, bias = true) =>
        node("Gemm", bias ? [x, `${prefix}.weight`, `${prefix}.bias`] : [x, `${prefix}.weight`], [
          int("transB", 1),
        ]);
      const config = model.config;
      const projected = config.hidden === 0
        ? gemm("features", "projection_head")
        : gemm(relu(bn(gemm("features", "projection_head.0"), "projection_head.1")), "projection_head.3");
      const norm = node("ReduceL2", [projected], [ints("axes", [1]), int("keepdims", 1)]);
      const floor = node("Max", [norm, constant("norm_floor", NORM_FLOOR)]);
      node("Div", [projected, floor], [], "embeddings");
      outputs.push(output("embeddings", config.out));
      // SwAV's single prototype head gives scores; other methods' heads are in the safetensors export.
      if (typeof config.prototypes === "number") {
        gemm("embeddings", "prototypes", false);
        nodes[nodes.length - 1]!.output = ["scores"];
        outputs.push(output("scores", config.prototypes));
      }
    }
    const message = onnx.ModelProto.create({
      irVersion: IR_VERSION,
      opsetImport: [{ domain: "", version: ONNX_OPSET }],
      producerName: "swav-ts",
      graph: {
        name: `swav_${model.config.arch}`,
        node: nodes,
        initializer,
        input: [{
          name: "images",
          type: {
            tensorType: {
              elemType: FLOAT,
              shape: {
                dim: [batch, { dimValue: model.config.inputChannels }, { dimParam: "H" }, { dimParam: "W" }],
              },
            },
          },
        }],
        output: outputs,
      },
    });
    return onnx.ModelProto.encode(message).finish();
  });

/** Writes the model to `path` as ONNX; returns the path. */
export const exportOnnx = (
  model: SwavModel,
  path: string,
  options: { head?: boolean } = {},
): Effect.Effect<string, ExportError> =>
  Effect.gen(function* () {
    const bytes = yield* onnxModelBytes(model, options);
    yield* Effect.tryPromise({
      try: () => writeFileAtomic(path, bytes),
      catch: (error) => new ExportError({ path, reason: reasonOf(error) }),
    });
    return path;
  });
