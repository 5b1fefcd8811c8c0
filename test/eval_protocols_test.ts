/**
 * The evaluation protocols against torch float64 transcriptions of SwAV's eval_linear.py and
 * eval_semisup.py (reference/eval_protocols_reference.py -> test/fixtures/eval_protocols.json):
 * the test-time Resize + CenterCrop, the linear evaluation's crops, lr schedule and first steps,
 * the semi-supervised subset and first fine-tuning steps.
 *
 * Tolerances (float32 against float64): transform pixels max abs 1e-5 against torchvision's
 * antialiased tensor path; against its PIL path (uint8, rounded after each resample pass) at most
 * 2/255 per value and 0.5/255 on average. Losses relative 1e-4; weights, logits and BatchNorm
 * statistics norm-wise relative 1e-4 (linear) and 1e-3 (fine-tuning, gradients through the whole
 * backbone, as test/resnet_test.ts).
 */
import * as tf from "@tensorflow/tfjs";
import assert from "node:assert/strict";
import { Effect } from "effect";
import { evalResizeFor, trainCropAt } from "../data/eval_augment.ts";
import type { RgbImage } from "../data/image_codec.ts";
import { rngFor } from "../data/rng.ts";
import { disposeModel, loadModelArrays, makeSwavModel, type ModelConfig } from "../models/model.ts";
import { backboneFeatureMap } from "../models/resnet.ts";
import { evalResizeSide } from "../pipelines/evaluate.ts";
import {
  backboneFeatures,
  makeRegLog,
  rawPixelFeatures,
  regLogLogits,
  regLogPool,
  regLogStep,
} from "../pipelines/linear_eval.ts";
import { probeLearningRate } from "../pipelines/linear_probe.ts";
import {
  fineTuneLogits,
  fineTuneStep,
  makeFineTuneState,
  multiStepLr,
  parseLabelFraction,
  selectLabelSubset,
  subsetFromNames,
} from "../pipelines/semisup.ts";
import { evalTransform } from "../stages/multicrop.ts";
import { assertNoTensorLeak, relativeError, useBackend, values } from "./_helpers.ts";

await useBackend("wasm");

interface Img {
  readonly height: number;
  readonly width: number;
  readonly data: number[];
}
interface Draw {
  readonly box: { top: number; left: number; height: number; width: number };
  readonly flip: boolean;
}
interface LinearCase {
  readonly name: string;
  readonly pooling: "global" | "avgpool";
  readonly batchNorm: boolean;
  readonly init: { weight: number[]; bias: number[] };
  readonly lrs: number[];
  readonly losses: number[];
  readonly weight: number[];
  readonly bias: number[];
  readonly testLogits: number[];
  readonly bn?: Record<string, number[]>;
}
const fixture: {
  resizeRule: number[];
  transform: (Img & { size: number; resize: number; image: number[]; pil: number[]; tensor: number[] })[];
  model: {
    config: ModelConfig;
    params: Record<string, string>;
    size: number;
    classes: number;
    mean: number[];
    std: number[];
  };
  images: Img[];
  labels: number[];
  testImages: Img[];
  testLabels: number[];
  epochs: { draws: Draw[] }[];
  firstCrops: number[];
  linear: LinearCase[];
  semisup: {
    init: { weight: number[]; bias: number[] };
    losses: number[];
    testLogits: number[];
    weight: number[];
    bias: number[];
    params: Record<string, number[]>;
  };
} = JSON.parse(await Deno.readTextFile(new URL("./fixtures/eval_protocols.json", import.meta.url)));

const rgb = (img: Img): RgbImage => ({
  width: img.width,
  height: img.height,
  data: Uint8Array.from(img.data),
});
const float32FromBase64 = (text: string) =>
  new Float32Array(Uint8Array.from(atob(text), (c) => c.charCodeAt(0)).buffer);
const close = (label: string, got: ArrayLike<number>, want: ArrayLike<number>, tol: number) => {
  const error = relativeError(got, want);
  assert.ok(error < tol, `${label}: relative error ${error.toExponential(2)} >= ${tol}`);
};

Deno.test("eval transform: the resize rule is int(size x 256 / 224), the default for every source", () => {
  fixture.resizeRule.forEach((want, i) => assert.equal(evalResizeFor(i + 1), want, `size ${i + 1}`));
  assert.equal(evalResizeFor(224), 256);
  assert.equal(evalResizeSide("auto", 224, "folder"), 256);
  assert.equal(evalResizeSide("auto", 28, "idx"), 32);
  assert.equal(evalResizeSide("auto", 32, "cifar10"), 36);
  assert.equal(evalResizeSide("none", 224, "folder"), undefined);
  assert.equal(evalResizeSide(300, 224, "idx"), 300);
});

Deno.test("eval transform matches torchvision's Resize + CenterCrop (tensor and PIL paths)", async (t) => {
  for (const c of fixture.transform) {
    await t.step(`${c.height}x${c.width} -> resize ${c.resize}, crop ${c.size}`, () => {
      const out = evalTransform(rgb({ height: c.height, width: c.width, data: c.image }), {
        size: c.size,
        resize: evalResizeFor(c.size),
        channels: 3,
        mean: [0, 0, 0],
        std: [1, 1, 1],
      });
      let maxTensor = 0;
      let maxPil = 0;
      let sumPil = 0;
      out.forEach((v, i) => {
        maxTensor = Math.max(maxTensor, Math.abs(v - c.tensor[i]!));
        const d = Math.abs(v - c.pil[i]! / 255);
        maxPil = Math.max(maxPil, d);
        sumPil += d;
      });
      assert.ok(maxTensor < 1e-5, `tensor path max abs ${maxTensor}`);
      assert.ok(maxPil <= 2 / 255 + 1e-6, `PIL path max abs ${maxPil * 255}/255`);
      assert.ok(sumPil / out.length < 0.5 / 255, `PIL path mean abs ${(sumPil / out.length) * 255}/255`);
    });
  }
});

const { config, size, classes, mean, std } = fixture.model;
const input = { size, channels: 3 as const, mean, std };
const loadModel = () => {
  const model = makeSwavModel(config, 1);
  Effect.runSync(loadModelArrays(
    model,
    model.params.map((p) => ({
      name: p.name,
      shape: [...p.variable.shape],
      values: float32FromBase64(fixture.model.params[p.name]!),
    })),
    "fixture",
  ));
  return model;
};
const cropsOf = (draws: Draw[]) => {
  const out = new Float32Array(draws.length * size * size * 3);
  draws.forEach((d, i) =>
    out.set(trainCropAt(rgb(fixture.images[i]!), d.box, d.flip, input), i * size * size * 3)
  );
  return tf.tensor4d(out, [draws.length, size, size, 3]);
};
const testBatch = () => {
  const out = new Float32Array(fixture.testImages.length * size * size * 3);
  fixture.testImages.forEach((img, i) =>
    out.set(
      evalTransform(rgb(img), { ...input, resize: evalResizeFor(size) }),
      i * size * size * 3,
    )
  );
  return tf.tensor4d(out, [fixture.testImages.length, size, size, 3]);
};
const labels = Int32Array.from(fixture.labels);

Deno.test("linear evaluation: crops, cosine lr and three steps of RegLog equal eval_linear.py", async (t) => {
  await t.step("RandomResizedCrop + flip crops equal torchvision's resized_crop + hflip", async () => {
    await assertNoTensorLeak("crops", async () => {
      const x = cropsOf(fixture.epochs[0]!.draws);
      const got = await x.data();
      x.dispose();
      let max = 0;
      got.forEach((v, i) => max = Math.max(max, Math.abs(v - fixture.firstCrops[i]!)));
      // Normalised values (divided by std ~0.22): 1e-5 in [0, 1] units is ~5e-5 here.
      assert.ok(max < 5e-5, `max abs ${max}`);
    });
  });
  for (const c of fixture.linear) {
    await t.step(c.name, async () => {
      await assertNoTensorLeak(c.name, async () => {
        const model = loadModel();
        const test = testBatch();
        const side = tf.tidy(() =>
          backboneFeatureMap(model.plan, model.param, test, { training: false }).shape[1]
        );
        const head = makeRegLog(model.plan.featureDim, side, classes, {
          pooling: c.pooling,
          batchNorm: c.batchNorm,
          seed: 0,
          init: { weight: Float32Array.from(c.init.weight), bias: Float32Array.from(c.init.bias) },
        });
        try {
          const epochs = fixture.epochs.length;
          for (let epoch = 0; epoch < epochs; epoch++) {
            const lr = probeLearningRate(epoch, { lr: 0.3, finalLr: 0, epochs });
            assert.ok(Math.abs(lr - c.lrs[epoch]!) < 1e-12, `epoch ${epoch} lr ${lr} vs ${c.lrs[epoch]}`);
            const x = cropsOf(fixture.epochs[epoch]!.draws);
            // The frozen features exactly as linearEvaluation computes them.
            const map = backboneFeatures(model).map(x);
            const loss = regLogStep(head, map, labels, classes, lr, {
              momentum: 0.9,
              weightDecay: 1e-6,
              nesterov: false,
            });
            const mean = (await loss.data())[0]! / labels.length;
            tf.dispose([x, map, loss]);
            const want = c.losses[epoch]!;
            assert.ok(Math.abs(mean - want) / want < 1e-4, `epoch ${epoch} loss ${mean} vs ${want}`);
          }
          close("weight", await values(head.weight), c.weight, 1e-4);
          close("bias", await values(head.bias), c.bias, 1e-4);
          for (const [name, want] of Object.entries(c.bn ?? {})) {
            close(`bn.${name}`, await values(head.bn!.get(`bn.${name}`)!), want, 1e-4);
          }
          const logits = tf.tidy(() =>
            regLogLogits(
              head,
              regLogPool(head, backboneFeatureMap(model.plan, model.param, test, { training: false })),
              false,
            )
          );
          close("test logits", await values(logits), c.testLogits, 1e-4);
          logits.dispose();
        } finally {
          head[Symbol.dispose]();
          test.dispose();
          disposeModel(model);
        }
      });
    });
  }
});

Deno.test("linear evaluation: the raw-pixel baseline's features are the crop's values in (row, column, channel) order", async () => {
  await assertNoTensorLeak("raw pixels", async () => {
    const [n, side, channels] = [2, 3, 2];
    const pixels = Float32Array.from({ length: n * side * side * channels }, () => Math.random());
    const x = tf.tensor4d(pixels, [n, side, side, channels]);
    const map = rawPixelFeatures(side, channels).map(x);
    assert.deepEqual(map.shape, [n, 1, 1, side * side * channels]);
    const got = await map.data();
    for (let b = 0; b < n; b++) {
      for (let i = 0; i < side; i++) {
        for (let j = 0; j < side; j++) {
          for (let c = 0; c < channels; c++) {
            const at = ((b * side + i) * side + j) * channels + c;
            assert.equal(got[b * side * side * channels + (i * side + j) * channels + c], pixels[at]);
          }
        }
      }
    }
    tf.dispose([x, map]);
  });
});

Deno.test("semisup: two fine-tuning steps (trunk lr 0.01, head lr 0.2) equal eval_semisup.py", async () => {
  await assertNoTensorLeak("semisup", async () => {
    const model = loadModel();
    const s = fixture.semisup;
    const state = makeFineTuneState(model, classes, 0, {
      weight: Float32Array.from(s.init.weight),
      bias: Float32Array.from(s.init.bias),
    });
    const test = testBatch();
    try {
      for (let step = 0; step < 2; step++) {
        const x = cropsOf(fixture.epochs[step]!.draws);
        const loss = fineTuneStep(model, state, x, labels, classes, { lr: 0.01, lrHead: 0.2 }, {
          momentum: 0.9,
          weightDecay: 0,
        });
        const mean = (await loss.data())[0]! / labels.length;
        tf.dispose([x, loss]);
        assert.ok(Math.abs(mean - s.losses[step]!) / s.losses[step]! < 1e-4, `step ${step} loss ${mean}`);
      }
      close("head weight", await values(state.weight), s.weight, 1e-3);
      close("head bias", await values(state.bias), s.bias, 1e-3);
      for (const [name, want] of Object.entries(s.params)) {
        close(name, await values(model.param(name)), want, 1e-3);
      }
      const logits = fineTuneLogits(model, state, test, false);
      close("test logits", await values(logits), s.testLogits, 1e-3);
      logits.dispose();
    } finally {
      state[Symbol.dispose]();
      test.dispose();
      disposeModel(model);
    }
  });
});

Deno.test("semisup: MultiStepLR, --labels parsing and the per-class subset", async () => {
  assert.equal(multiStepLr(0.01, 11, [12, 16], 0.2), 0.01);
  assert.ok(Math.abs(multiStepLr(0.01, 12, [12, 16], 0.2) - 0.002) < 1e-15);
  assert.ok(Math.abs(multiStepLr(0.2, 19, [12, 16], 0.2) - 0.008) < 1e-15);
  assert.equal(parseLabelFraction("1%"), 0.01);
  assert.equal(parseLabelFraction("10%"), 0.1);
  assert.equal(parseLabelFraction("0%"), undefined);
  assert.equal(parseLabelFraction("subset.txt"), undefined);
  // Fresh random class sizes: the counts follow round(fraction x count), at least one.
  const rng = rngFor(Date.now() % 100000, 3);
  const sizes = Array.from({ length: 7 }, () => rng.int(1, 400));
  const labels = Int32Array.from(sizes.flatMap((n, c) => new Array(n).fill(c)));
  const order = rngFor(5, 9).permutation(labels.length);
  const shuffled = Int32Array.from(order, (i) => labels[i]!);
  for (const fraction of [0.01, 0.1]) {
    const subset = selectLabelSubset(shuffled, 7, fraction, 31);
    const counts = new Array(7).fill(0);
    subset.forEach((i) => counts[shuffled[i]!]++);
    assert.deepEqual(counts, sizes.map((n) => Math.max(1, Math.round(fraction * n))));
    assert.deepEqual(subset, [...new Set(subset)].sort((a, b) => a - b));
    assert.deepEqual(
      selectLabelSubset(shuffled, 7, fraction, 31),
      subset,
      "the same seed gives the same subset",
    );
    assert.notDeepEqual(selectLabelSubset(shuffled, 7, fraction, 32), subset, "another seed another subset");
  }
  const paths = ["/d/train/cat/cat_1.png", "/d/train/cat/cat_2.png", "/d/train/dog/dog_1.png"];
  assert.deepEqual(
    await Effect.runPromise(subsetFromNames(paths, ["dog_1.png", "", "# c", "cat_1.png"], "f")),
    [0, 2],
  );
  const missing = await Effect.runPromise(Effect.flip(subsetFromNames(paths, ["cow_1.png"], "f")));
  assert.match(missing.message, /1 of 1 names are not in the train source \(first: cow_1\.png\)/);
});
