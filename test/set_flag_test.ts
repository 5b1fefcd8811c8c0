/** `pretrain --set KEY=JSON`: checked against the schema before anything runs, applied between file and flags. */
import assert from "node:assert/strict";
import { writeDemoDataset } from "../data/demo_dataset.ts";
import { parseSetting, settingsObject } from "../config/settings.ts";
import { runCli } from "./_helpers.ts";

Deno.test("--set: an unknown key, a wrong type or bad JSON is one line naming the key, exit 1, before training", async (t) => {
  const folder = await Deno.makeTempDir({ prefix: "swav-set-" });
  try {
    const cases: [string, RegExp][] = [
      [
        "swav.epsilonn=0.1",
        /^error: InvalidConfig: --set swav\.epsilonn=0\.1: unknown key "epsilonn" in swav \(known: temperature, epsilon, /,
      ],
      [
        'swav.epsilon="big"',
        /^error: InvalidConfig: --set swav\.epsilon="big": swav\.epsilon: Expected number, got "big"$/,
      ],
      ['multicrop.nmbCrops=[2,"x"]', /multicrop\.nmbCrops: Expected number at \[1\]/],
      ["train.method=simclr", /the value "simclr" is not JSON \(strings need double quotes/],
      ["nosuch=1", /unknown key "nosuch" in the config \(known: recipe, data, multicrop, model, swav,/],
    ];
    for (const [setting, pattern] of cases) {
      await t.step(setting, async () => {
        const out = `${folder}/run`;
        const r = await runCli(["pretrain", "--set", setting, "--out", out]);
        assert.equal(r.code, 1, r.stderr);
        const lines = r.stderr.trim().split("\n");
        assert.equal(lines.length, 1, r.stderr);
        assert.match(lines[0]!, pattern);
        assert.equal(r.stdout, "");
        await assert.rejects(Deno.stat(out), Deno.errors.NotFound, "nothing was written");
      });
    }
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
});

Deno.test("--set: a valid setting reaches config.json, over the file and under the explicit flags", async () => {
  const folder = await Deno.makeTempDir({ prefix: "swav-set-" });
  try {
    await writeDemoDataset({
      folder: `${folder}/data`,
      perClassTrain: 4,
      perClassTest: 1,
      size: 16,
      seed: 2,
    });
    await Deno.writeTextFile(
      `${folder}/tiny.json`,
      JSON.stringify({
        data: { source: `${folder}/data:train`, workers: 0 },
        multicrop: { nmbCrops: [2], sizeCrops: [16], minScaleCrops: [0.3], maxScaleCrops: [1], blur: false },
        model: { arch: "resnet18", width: 4, stem: "cifar", hidden: 16, out: 8, prototypes: 20 },
        swav: { epsilon: 0.05 },
        train: { epochs: 1, batchSize: 8, maxSteps: 1, seed: 3 },
      }),
    );
    const out = `${folder}/run`;
    const r = await runCli([
      "pretrain",
      "--config",
      `${folder}/tiny.json`,
      "--set",
      "swav.epsilon=0.03",
      "--set",
      "multicrop.nmbCrops=[2,2]",
      "--set",
      "multicrop.sizeCrops=[16,8]",
      "--set",
      "multicrop.minScaleCrops=[0.3,0.1]",
      "--set",
      "multicrop.maxScaleCrops=[1,0.3]",
      "--set",
      "train.seed=5",
      "--seed",
      "7",
      "--out",
      out,
    ]);
    assert.equal(r.code, 0, r.stderr);
    const config = JSON.parse(await Deno.readTextFile(`${out}/config.json`));
    assert.equal(config.swav.epsilon, 0.03, "--set over the file");
    assert.deepEqual(config.multicrop.nmbCrops, [2, 2]);
    assert.deepEqual(config.multicrop.sizeCrops, [16, 8]);
    assert.equal(config.train.seed, 7, "an explicit flag over --set");
    assert.equal(config.model.prototypes, 20, "the file's other fields stay");
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
});

Deno.test("settingsObject: dotted keys nest, a later setting of the same key wins", () => {
  const parse = (text: string) => {
    const s = parseSetting(text);
    if (s instanceof Error) throw s;
    return s;
  };
  assert.deepEqual(
    settingsObject([parse("swav.epsilon=0.1"), parse("swav.temperature=0.2"), parse("swav.epsilon=0.3")]),
    { swav: { epsilon: 0.3, temperature: 0.2 } },
  );
  assert.ok(parseSetting("=1") instanceof Error);
  assert.ok(parseSetting("swav..epsilon=1") instanceof Error);
});
