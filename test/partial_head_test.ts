/**
 * Weight files with part of the head: the projection head alone, prototypes alone (one head or
 * DeepCluster-v2's several), or fewer prototype heads than the run's config asks. A head part the
 * file lacks is never replaced silently by random values: the mapping names it (`absentHead`),
 * `pretrain --init` loads the parts the file has and says in one line which start from the seed,
 * and `export --head` refuses in one line naming what is missing.
 *
 * The in-memory cases cut keys out of the main_swav fixture (test/fixtures/torch/resnet18.pth: a
 * ResNet-18 of width 2, head 16 -> 8, 10 prototypes); the file cases write them with torch.
 */
import assert from "node:assert/strict";
import { Effect, Exit } from "effect";
import { initBackend } from "../backend/tensor_backend.ts";
import { readTorchStateDict } from "../data/torch_checkpoint.ts";
import { decodeModelConfig, readModelArrays, scopedSwavModel } from "../models/model.ts";
import { mapTorchWeights, PROJECTION_HEAD, type TorchArray } from "../models/torch_names.ts";
import { exportCheckpointEncoder } from "../pipelines/extract_folder.ts";
import {
  assignWeights,
  initFromWeightsFile,
  initNote,
  missingHeadMessage,
} from "../pipelines/torch_weights.ts";
import { needs, PYTHON } from "./_optional.ts";

await initBackend("wasm");
const fixture = new URL("./fixtures/torch/resnet18.pth", import.meta.url).pathname;
const full = (await Effect.runPromise(readTorchStateDict(fixture))).tensors;
const HEAD_OF_FIXTURE = { arch: "resnet18", width: 2, stem: "imagenet", hidden: 16, out: 8 } as const;

/** The fixture's tensors without the keys `drop` matches, prototypes renamed by `rename`. */
const cut = (drop: RegExp, rename: (key: string) => string[] = (key) => [key]) => {
  const out = new Map<string, TorchArray>();
  for (const [key, tensor] of full) {
    if (drop.test(key)) continue;
    for (const name of rename(key)) out.set(name, tensor);
  }
  return out;
};
/** DeepCluster-v2's layout with `heads` copies of the fixture's prototypes. */
const multiHead = (heads: number) => (key: string) =>
  key === "module.prototypes.weight"
    ? Array.from({ length: heads }, (_, h) => `module.prototypes.prototypes${h}.weight`)
    : [key];

const map = (tensors: ReadonlyMap<string, TorchArray>, given: Record<string, unknown> = {}) =>
  Effect.runPromise(
    Effect.gen(function* () {
      const config = Object.keys(given).length === 0
        ? {}
        : yield* decodeModelConfig({ ...HEAD_OF_FIXTURE, ...given });
      return yield* mapTorchWeights(tensors, "test file", config);
    }),
  );

Deno.test("a file's head parts are read when present and named when absent, never filled in silently", async () => {
  const whole = await map(full);
  assert.deepEqual([whole.hasHead, whole.absentHead, whole.unusedHead], [true, [], []]);

  const projectionOnly = await map(cut(/prototypes/));
  assert.equal(projectionOnly.hasHead, false);
  assert.deepEqual(projectionOnly.absentHead, ["prototypes.weight"]);
  assert.ok(projectionOnly.arrays.some((a) => a.name === "projection_head.3.weight"));
  assert.equal(projectionOnly.config.out, 8);

  const prototypesOnly = await map(cut(/projection_head/));
  assert.deepEqual(prototypesOnly.absentHead, [PROJECTION_HEAD]);
  assert.deepEqual([prototypesOnly.config.prototypes, prototypesOnly.config.out], [10, 8]);
  assert.ok(prototypesOnly.arrays.some((a) => a.name === "prototypes.weight"));
  assert.ok(!prototypesOnly.arrays.some((a) => a.name.startsWith("projection_head")));

  const backboneOnly = await map(cut(/projection_head|prototypes/));
  assert.deepEqual(backboneOnly.absentHead, [PROJECTION_HEAD, "prototypes.weight"]);

  // DeepCluster-v2: a file of 2 heads where the run's config asks 3; the third is named.
  const twoOfThree = await map(cut(/^$/, multiHead(2)), { prototypes: [10, 10, 10] });
  assert.deepEqual(twoOfThree.absentHead, ["prototypes.prototypes2.weight"]);
  assert.deepEqual(twoOfThree.unusedHead, []);
  // Prototypes named for another layout than the config's are named as not used.
  const otherLayout = await map(full, { prototypes: [10, 10] });
  assert.deepEqual(otherLayout.absentHead, [
    "prototypes.prototypes0.weight",
    "prototypes.prototypes1.weight",
  ]);
  assert.deepEqual(otherLayout.unusedHead, ["module.prototypes.weight"]);
});

Deno.test("--init with part of the head: the file's parts are loaded, the others keep the seeded values", async () => {
  await Effect.runPromise(Effect.scoped(Effect.gen(function* () {
    const config = yield* decodeModelConfig({ ...HEAD_OF_FIXTURE, prototypes: [10, 10, 10] });
    const model = yield* scopedSwavModel(config, 5);
    const seeded = new Map((yield* readModelArrays(model)).map((a) => [a.name, a.values]));
    const weights = yield* mapTorchWeights(cut(/projection_head/, multiHead(2)), "test file", config);
    yield* assignWeights(model, weights, "test file");
    const after = new Map((yield* readModelArrays(model)).map((a) => [a.name, a.values]));
    const fromFile = full.get("module.prototypes.weight")!.values;
    for (const h of [0, 1]) {
      assert.deepEqual([...after.get(`prototypes.prototypes${h}.weight`)!], [...fromFile], `head ${h}`);
    }
    for (
      const name of ["prototypes.prototypes2.weight", "projection_head.0.weight", "projection_head.3.bias"]
    ) {
      assert.deepEqual(after.get(name), seeded.get(name), `${name} keeps its seeded value`);
    }
    assert.deepEqual(
      [...after.get("backbone.conv1.weight")!].length,
      seeded.get("backbone.conv1.weight")!.length,
    );
    assert.notDeepEqual(after.get("backbone.conv1.weight"), seeded.get("backbone.conv1.weight"));
  })));
});

Deno.test("the --init line and the export --head refusal name the missing head parts in one line", () => {
  const none = { absentHead: [], unusedHead: [], backboneOnly: false };
  assert.equal(initNote("w.pth", none), "weights initialised from w.pth");
  const third = initNote("w.pth", { ...none, absentHead: ["prototypes.prototypes2.weight"] });
  assert.equal(
    third,
    "weights initialised from w.pth, but the file lacks prototypes.prototypes2.weight: it starts from " +
      "random values (the run's seed)",
  );
  const two = initNote("w.pth", { ...none, absentHead: [PROJECTION_HEAD, "prototypes.weight"] });
  assert.match(two, /lacks the projection head \(projection_head\.\*\) and prototypes\.weight: they start/);
  const unused = initNote("w.pth", {
    ...none,
    absentHead: ["prototypes.weight"],
    unusedHead: ["prototypes.prototypes0.weight"],
  });
  assert.match(
    unused,
    /its prototypes\.prototypes0\.weight fits no head of the run's config .* is not used$/,
  );
  const backbone = initNote("w.pth", {
    absentHead: [PROJECTION_HEAD, "prototypes.weight"],
    unusedHead: [],
    backboneOnly: true,
  });
  assert.match(backbone, /the backbone only .*start from random values/);
  assert.equal(
    missingHeadMessage("w.pth", [PROJECTION_HEAD]),
    "w.pth lacks the projection head (projection_head.*): --head would write random values in their " +
      "place; export without --head, or from a file with the whole head",
  );
  for (const line of [third, two, unused, backbone]) assert.ok(!line.includes("\n"));
});

/** The fixture re-saved by torch with `keep` deciding each key, prototypes copied into `heads` DC-v2 heads. */
const torchFile = async (dir: string, name: string, drop: string, heads = 0) => {
  const script = `
import re, sys, torch
sd = torch.load(sys.argv[1], map_location="cpu")["state_dict"]
out = {k: v for k, v in sd.items() if not (sys.argv[3] and re.search(sys.argv[3], k))}
heads = int(sys.argv[4])
if heads and "module.prototypes.weight" in out:
    w = out.pop("module.prototypes.weight")
    for h in range(heads):
        out[f"module.prototypes.prototypes{h}.weight"] = w.clone()
torch.save({"state_dict": out}, sys.argv[2])
`;
  const path = `${dir}/${name}.pth`;
  const run = await new Deno.Command(PYTHON, {
    args: ["-c", script, fixture, path, drop, String(heads)],
    stderr: "piped",
  }).output();
  assert.ok(run.success, new TextDecoder().decode(run.stderr));
  return path;
};

Deno.test({
  name:
    "files with part of the head: export --head refuses naming the part, --init names what starts from the seed",
  ...needs("torch"),
  fn: async () => {
    const dir = await Deno.makeTempDir({ prefix: "swav-partial-head-" });
    try {
      const cases = [
        { name: "projection", drop: "prototypes", heads: 0, missing: "prototypes.weight" },
        { name: "prototypes", drop: "projection_head", heads: 0, missing: "the projection head" },
        { name: "dc2-prototypes", drop: "projection_head", heads: 2, missing: "the projection head" },
      ];
      for (const c of cases) {
        const file = await torchFile(dir, c.name, c.drop, c.heads);
        const out = `${dir}/${c.name}.safetensors`;
        const exit = await Effect.runPromiseExit(
          exportCheckpointEncoder(file, out, undefined, { format: "safetensors", head: true }),
        );
        assert.ok(Exit.isFailure(exit), `${c.name}: export --head wrote random values`);
        assert.match(String(exit.cause), new RegExp(`${file} lacks ${c.missing.replace(/[.*()]/g, "\\$&")}`));
        await assert.rejects(Deno.stat(out), Deno.errors.NotFound);
        // Without --head the backbone exports as before.
        const backbone = await Effect.runPromise(
          exportCheckpointEncoder(file, out, undefined, { format: "safetensors" }),
        );
        assert.equal(backbone, out);
      }
      // --init into a DeepCluster-v2 run of 3 heads from a file of 2 heads and no projection head.
      const file = await torchFile(dir, "init", "projection_head", 2);
      const note = await Effect.runPromise(Effect.scoped(Effect.gen(function* () {
        const config = yield* decodeModelConfig({ ...HEAD_OF_FIXTURE, prototypes: [10, 10, 10] });
        const model = yield* scopedSwavModel(config, 5);
        return initNote(file, yield* initFromWeightsFile(model, file));
      })));
      assert.equal(
        note,
        `weights initialised from ${file}, but the file lacks the projection head (projection_head.*) and ` +
          "prototypes.prototypes2.weight: they start from random values (the run's seed)",
      );
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});
