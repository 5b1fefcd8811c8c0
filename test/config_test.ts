import assert from "node:assert/strict";
import { Effect } from "effect";
import { decodeRunConfig, mergeConfig } from "../config/config.ts";
import { withDataDefaults } from "../config/data_defaults.ts";

const decode = (raw: unknown) => Effect.runPromise(decodeRunConfig(raw, "test"));

Deno.test("data defaults: prototypes 10x the classes, a queue for small batches, explicit values kept", async () => {
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
  assert.equal(large.model.prototypes, 10000);
  assert.equal(large.swav.queueLength, 0);
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
