import assert from "node:assert/strict";
import { Effect } from "effect";
import { decodeRunConfig, mergeConfig } from "../config/config.ts";
import { SMALL_DATA_IMAGES, withDataDefaults } from "../config/data_defaults.ts";
import { effectiveOptim } from "../config/config.ts";
import { RECIPE_NAMES, recipeConfig } from "../config/recipes.ts";

const decode = (raw: unknown) => Effect.runPromise(decodeRunConfig(raw, "test"));

Deno.test("data defaults: 3000 prototypes, 10x the classes for small sets, a queue for small batches that reach it, explicit values kept", async () => {
  const labelled = await decode(withDataDefaults({}, { classes: 10, length: 60000 }));
  assert.equal(labelled.model.prototypes, 100);
  assert.equal(labelled.swav.queueLength, 3840); // batch 64 < 256: the reference's queue, capped
  const small = await decode(withDataDefaults({ train: { batchSize: 32 } }, { classes: 4, length: 400 }));
  assert.equal(small.model.prototypes, 40);
  assert.equal(small.swav.queueLength, 100); // a quarter of the data set
  const unlabelled = await decode(withDataDefaults({}, { classes: undefined, length: 10000 }));
  assert.equal(unlabelled.model.prototypes, 500);
  const large = await decode(
    withDataDefaults({ train: { batchSize: 256 } }, { classes: 1000, length: 1281167 }),
  );
  // At and above SMALL_DATA_IMAGES the reference's 3000, whatever the classes.
  assert.equal(large.model.prototypes, 3000);
  assert.equal(large.swav.queueLength, 0);
  const justLarge = await decode(withDataDefaults({}, { classes: 10, length: SMALL_DATA_IMAGES }));
  assert.equal(justLarge.model.prototypes, 3000);
  const justSmall = await decode(withDataDefaults({}, { classes: 10, length: SMALL_DATA_IMAGES - 1 }));
  assert.equal(justSmall.model.prototypes, 100);
  // A run too short to reach the queue's start epoch gets none.
  const short = await decode(withDataDefaults({ train: { epochs: 15 } }, { classes: 10, length: 60000 }));
  assert.equal(short.swav.queueLength, 0);
  const reaches = await decode(withDataDefaults({ train: { epochs: 16 } }, { classes: 10, length: 60000 }));
  assert.equal(reaches.swav.queueLength, 3840);
  // The crop size from the data only when asked (the small-data recipe), and never over an explicit one.
  const facts = { classes: 10, length: 60000, imageSide: 28 };
  assert.deepEqual(
    (await decode(withDataDefaults(recipeConfig("small-data"), facts, { cropSideFromData: true })))
      .multicrop.sizeCrops,
    [
      28,
    ],
  );
  assert.deepEqual((await decode(withDataDefaults(recipeConfig("small-data"), facts))).multicrop.sizeCrops, [
    32,
  ]);
  const grey = await decode(
    withDataDefaults(recipeConfig("small-data"), { ...facts, channels: 1 }, { cropSideFromData: true }),
  );
  assert.deepEqual([grey.multicrop.channels, grey.model.inputChannels], [1, 1]);
  assert.deepEqual(
    (await decode(withDataDefaults({}, facts, { cropSideFromData: true }))).multicrop.sizeCrops,
    [
      224,
      96,
    ],
  );
  const explicit = await decode(
    withDataDefaults({ model: { prototypes: 3000 }, swav: { queueLength: 0 } }, {
      classes: 10,
      length: 60000,
    }),
  );
  assert.equal(explicit.model.prototypes, 3000);
  assert.equal(explicit.swav.queueLength, 0);
});

Deno.test("mergeConfig: flags override nested fields, undefined flags leave the file's values", () => {
  const merged = mergeConfig(
    { train: { epochs: 5, batchSize: 32 }, model: { arch: "resnet18" } },
    { train: { epochs: 2, batchSize: undefined }, data: { source: "x" } },
  );
  assert.deepEqual(merged, {
    train: { epochs: 2, batchSize: 32 },
    model: { arch: "resnet18" },
    data: { source: "x" },
  });
});

Deno.test("mergeConfig: undefined flags never reach a section the file lacks", () => {
  assert.deepEqual(mergeConfig({}, { data: { source: "x", workers: undefined } }), { data: { source: "x" } });
});

Deno.test("recipes: each preset is a complete valid config; the reference scripts' values", async () => {
  for (const name of RECIPE_NAMES) {
    const config = await decode(recipeConfig(name));
    assert.equal(config.recipe?.name, name);
  }
  const large = await decode(recipeConfig("swav_800ep_pretrain"));
  // At the reference's 64 workers x 64 the linear rule gives the script's 4.8 -> 0.0048 from 0.3.
  const atReference = effectiveOptim(large.optim, 64 * large.train.batchSize);
  assert.ok(Math.abs(atReference.baseLr - 4.8) < 1e-12);
  assert.ok(Math.abs(atReference.finalLr - 0.0048) < 1e-15);
  assert.ok(Math.abs(atReference.startWarmup - 0.3) < 1e-12);
  // One process of 64: scaled by 64/4096.
  assert.ok(Math.abs(effectiveOptim(large.optim, 64).baseLr - 4.8 * 64 / 4096) < 1e-12);
  assert.deepEqual(
    [large.train.epochs, large.optim.warmupEpochs, large.swav.freezePrototypesIters, large.swav.queueLength],
    [800, 10, 313, 0],
  );
  assert.deepEqual([large.model.prototypes, large.swav.epsilon, large.multicrop.nmbCrops], [3000, 0.05, [
    2,
    6,
  ]]);
  assert.equal((await decode(recipeConfig("swav_400ep_pretrain"))).train.epochs, 400);
  const bs256 = await decode(recipeConfig("swav_400ep_bs256_pretrain"));
  const at256 = effectiveOptim(bs256.optim, 4 * bs256.train.batchSize);
  assert.deepEqual([at256.baseLr, at256.finalLr, at256.startWarmup, bs256.optim.warmupEpochs], [
    0.6,
    0.0006,
    0,
    0,
  ]);
  assert.deepEqual([bs256.swav.freezePrototypesIters, bs256.swav.queueLength, bs256.swav.queueStartEpoch], [
    5005,
    3840,
    15,
  ]);
  // "none" leaves the rates as given.
  assert.equal(effectiveOptim({ ...bs256.optim, lrScaling: "none" }, 4096).baseLr, 0.6);
});

Deno.test("recipes: --epochs rescales warm-up, queue start and prototype freezing in proportion", async () => {
  const scaled = await decode(recipeConfig("swav_800ep_pretrain", 100));
  assert.equal(scaled.train.epochs, 100);
  assert.equal(scaled.optim.warmupEpochs, 10 * 100 / 800);
  assert.equal(scaled.swav.freezePrototypesIters, Math.round(313 / 8));
  assert.equal(scaled.recipe?.epochScale, 1 / 8);
  const bs256 = await decode(recipeConfig("swav_400ep_bs256_pretrain", 40));
  assert.deepEqual([bs256.swav.queueStartEpoch, bs256.swav.freezePrototypesIters], [
    2,
    Math.round(5005 / 10),
  ]);
  // The preset's own length leaves it as it is.
  assert.deepEqual(recipeConfig("small-data", 6), recipeConfig("small-data"));
});
