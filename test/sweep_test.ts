/** `deno task sweep` on a tiny labelled set: two cells, finite scores, the table's shape, a rerun that does not retrain. */
import assert from "node:assert/strict";
import { Effect, Exit } from "effect";
import { TensorBackend } from "../backend/tensor_backend.ts";
import { writeDemoDataset } from "../data/demo_dataset.ts";
import {
  gridCells,
  parseGridAxis,
  type SweepAxis,
  type SweepCellResult,
  sweepFromFile,
} from "../pipelines/sweep.ts";
import { parseSweepArgs } from "../cli/sweep.ts";

const folder = await Deno.makeTempDir({ prefix: "swav-sweep-" });
await writeDemoDataset({ folder: `${folder}/data`, perClassTrain: 12, perClassTest: 4, size: 16, seed: 1 });
await Deno.writeTextFile(
  `${folder}/tiny.json`,
  JSON.stringify({
    data: { source: `${folder}/data:train`, workers: 0 },
    multicrop: { nmbCrops: [2], sizeCrops: [16], minScaleCrops: [0.3], maxScaleCrops: [1], blur: false },
    model: { arch: "resnet18", width: 4, stem: "cifar", hidden: 32, out: 16, prototypes: 20 },
    train: { epochs: 1, batchSize: 16, knnK: 10 },
  }),
);
const sweepCli = new URL("../cli/sweep.ts", import.meta.url).pathname;

const sweep = (out: string, onCell: (c: SweepCellResult) => void) =>
  Effect.runPromiseExit(
    sweepFromFile({
      config: `${folder}/tiny.json`,
      grid: ['train.method="swav"|"simclr"'],
      out,
      probeEpochs: 2,
      hooks: { onCell },
    }).pipe(Effect.provide(TensorBackend.layer("wasm"))),
  );

Deno.test({
  name: "sweep: two cells with finite scores, the table's shape, and a rerun does not retrain",
  fn: async () => {
    const out = `${folder}/sweep`;
    const first: SweepCellResult[] = [];
    const exit = await sweep(out, (c) => first.push(c));
    assert.ok(Exit.isSuccess(exit), String(Exit.isFailure(exit) ? exit.cause : ""));
    assert.deepEqual(first.map((c) => c.name), ["method-swav", "method-simclr"]);
    for (const c of first) {
      assert.ok(!c.reused && c.steps === 7, JSON.stringify(c));
      assert.ok(
        c.knnTop1 >= 0 && c.knnTop1 <= 1 && c.linearTop1 >= 0 && c.linearTop1 <= 1,
        JSON.stringify(c),
      );
      const config = JSON.parse(await Deno.readTextFile(`${out}/${c.name}/config.json`));
      assert.equal(config.train.method, c.settings["train.method"], "the cell's setting reached its run");
    }
    const md = (await Deno.readTextFile(`${out}/sweep.md`)).trim().split("\n");
    assert.equal(md.length, 2 + 2, "header, rule, one row per cell");
    assert.equal(md[0], "| train.method | kNN top-1 | linear top-1 | steps |");
    assert.match(md[2]!, /^\| "swav" \| \d+\.\d\d \| \d+\.\d\d \| 7 \|$/);
    const saved = JSON.parse(await Deno.readTextFile(`${out}/sweep.json`));
    assert.deepEqual(saved.grid, [{ key: "train.method", values: ["swav", "simclr"] }]);
    assert.equal(saved.cells.length, 2);
    const html = await Deno.readTextFile(`${out}/sweep.html`);
    assert.equal(html.match(/<svg/g)?.length, 2, "kNN and linear bars");

    // A rerun reads both cells back; with one cell.json removed (stopped after training), that cell
    // resumes from its last checkpoint: no new steps.
    const again: SweepCellResult[] = [];
    assert.ok(Exit.isSuccess(await sweep(out, (c) => again.push(c))));
    assert.deepEqual(again.map((c) => c.reused), [true, true]);
    assert.deepEqual(again.map((c) => c.knnTop1), first.map((c) => c.knnTop1));
    await Deno.remove(`${out}/method-simclr/cell.json`);
    const third: SweepCellResult[] = [];
    assert.ok(Exit.isSuccess(await sweep(out, (c) => third.push(c))));
    assert.deepEqual(third.map((c) => c.reused), [true, false]);
    assert.equal(third[1]!.steps, 7);
  },
});

Deno.test("sweep: a bad --grid key, type or JSON is one line, exit 1, before anything runs", async (t) => {
  const cases: [string, RegExp][] = [
    [
      "swav.epsilonn=0.1|0.2",
      /^sweep: --grid swav\.epsilonn=0\.1\|0\.2: unknown key "epsilonn" in swav \(known: /,
    ],
    [
      'swav.epsilon=0.1|"x"',
      /^sweep: --grid swav\.epsilon=0\.1\|"x": swav\.epsilon: Expected number, got "x"$/,
    ],
    ["train.method=swav|simclr", /is not JSON/],
    ["multicrop.nmbCrops=[2]|[2,-4]", /multicrop\.nmbCrops: .*got \[2,-4\]/],
    // Each value is valid alone; the second cell's config is not (a list of heads under swav): refused
    // before the first, valid cell trains.
    [
      "model.prototypes=20|[20,20]",
      /^sweep: sweep cell prototypes-20,20: model\.prototypes is a list \[20,20\]/,
    ],
  ];
  for (const [grid, pattern] of cases) {
    await t.step(grid, async () => {
      const out = `${folder}/bad`;
      const r = await new Deno.Command(Deno.execPath(), {
        args: [
          "run",
          "--allow-all",
          sweepCli,
          "--config",
          `${folder}/tiny.json`,
          "--grid",
          grid,
          "--out",
          out,
        ],
        env: { NO_COLOR: "1", SWAV_BACKEND: "wasm" },
        stdout: "piped",
        stderr: "piped",
      }).output();
      const stderr = new TextDecoder().decode(r.stderr).trim();
      assert.equal(r.code, 1, stderr);
      assert.equal(stderr.split("\n").length, 1, stderr);
      assert.match(stderr, pattern);
      await assert.rejects(Deno.stat(out), Deno.errors.NotFound, "nothing was written");
    });
  }
});

Deno.test("sweep grid: every combination, first axis outermost, folders named after the values", () => {
  const axis = (text: string) => {
    const a = parseGridAxis(text);
    if (a instanceof Error) throw a;
    return a;
  };
  const axes: SweepAxis[] = [axis("multicrop.nmbCrops=[2]|[2,4]"), axis('train.method="swav"|"simclr"')];
  assert.deepEqual(axes[0]!.values, [[2], [2, 4]]);
  assert.deepEqual(gridCells(axes).map((c) => c.name), [
    "nmbCrops-2_method-swav",
    "nmbCrops-2_method-simclr",
    "nmbCrops-2,4_method-swav",
    "nmbCrops-2,4_method-simclr",
  ]);
  // Values that clean to the same name stay apart.
  assert.deepEqual(gridCells([axis('data.source="a b"|"ab"')]).map((c) => c.name), [
    "source-ab",
    "source-ab-2",
  ]);
  assert.throws(() => parseSweepArgs(["--grid", "x=1"]), /--config FILE is required/);
  assert.throws(() => parseSweepArgs(["--config", "c.json"]), /--grid KEY=V1\|V2 is required/);
  assert.throws(
    () => parseSweepArgs(["--config", "c.json", "--grid", "a=1", "--seeds", "2"]),
    /unknown argument --seeds/,
  );
  assert.deepEqual(
    parseSweepArgs(["--config", "c.json", "--grid", "a=1", "--grid", "b=2", "--epochs", "3"]),
    {
      config: "c.json",
      grid: ["a=1", "b=2"],
      out: "runs/sweep",
      epochs: 3,
      probeEpochs: 20,
    },
  );
});

globalThis.addEventListener("unload", () => Deno.removeSync(folder, { recursive: true }));
