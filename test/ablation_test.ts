/** The multi-crop ablation on a tiny labelled set, one epoch: six cells, finite numbers, a resumable grid. */
import assert from "node:assert/strict";
import { Effect, Exit } from "effect";
import { TensorBackend } from "../backend/tensor_backend.ts";
import { writeDemoDataset } from "../data/demo_dataset.ts";
import { ABLATION_METHODS, type CellResult, runAblation } from "../pipelines/ablation.ts";
import { parseAblationArgs } from "../cli/ablation.ts";

const data = await Deno.makeTempDir({ prefix: "swav-ablation-data-" });
await writeDemoDataset({ folder: data, perClassTrain: 12, perClassTest: 4, size: 16, seed: 1 });

const tiny = {
  data: { workers: 0 },
  model: { width: 4, hidden: 32, out: 16 },
  train: { batchSize: 16, knnK: 10 },
};

const run = (out: string, onCell: (c: CellResult) => void) =>
  Effect.runPromiseExit(
    runAblation({ data, epochs: 1, seeds: 1, out, probeEpochs: 2, base: tiny, hooks: { onCell } }).pipe(
      Effect.provide(TensorBackend.layer("wasm")),
    ),
  );

Deno.test("ablation: six cells with finite scores, the table's shape, and a stopped grid resumes without retraining", async () => {
  const out = await Deno.makeTempDir({ prefix: "swav-ablation-" });
  try {
    const first: CellResult[] = [];
    const exit = await run(out, (c) => first.push(c));
    assert.ok(Exit.isSuccess(exit), String(Exit.isFailure(exit) ? exit.cause : ""));
    assert.equal(first.length, 6);
    assert.ok(first.every((c) => !c.reused && c.steps === 7));
    for (const c of first) {
      assert.ok(
        c.knnTop1 >= 0 && c.knnTop1 <= 1 && c.linearTop1 >= 0 && c.linearTop1 <= 1,
        JSON.stringify(c),
      );
    }
    const { table } = exit.value;
    assert.deepEqual(table.map((r) => r.method), [...ABLATION_METHODS]);
    for (const r of table) {
      assert.ok(Number.isFinite(r.knn.gain) && Number.isFinite(r.linear.gain));
      assert.ok(Math.abs(r.knn.multiCrop - r.knn.twoCrops - r.knn.gain) < 1e-12);
    }
    const md = await Deno.readTextFile(`${out}/ablation.md`);
    assert.equal(md.trim().split("\n").length, 2 + 3);
    const html = await Deno.readTextFile(`${out}/ablation.html`);
    assert.equal(html.match(/<svg/g)?.length, 2, "two grouped bar charts");
    const saved = JSON.parse(await Deno.readTextFile(`${out}/ablation.json`));
    assert.equal(saved.cells.length, 6);

    // A stopped grid: one cell's result removed (as if stopped after training it); the rerun reads back
    // the five finished cells and redoes only that one, from its last checkpoint (no new steps).
    await Deno.remove(`${out}/simclr-multicrop-seed0/cell.json`);
    const second: CellResult[] = [];
    const again = await run(out, (c) => second.push(c));
    assert.ok(Exit.isSuccess(again), String(Exit.isFailure(again) ? again.cause : ""));
    assert.equal(second.filter((c) => c.reused).length, 5);
    const redone = second.find((c) => !c.reused)!;
    assert.equal(redone.method, "simclr");
    assert.equal(redone.steps, 7);

    // Another budget (two epochs) in the same folder: refused in one line, nothing reused silently.
    const other = await Effect.runPromiseExit(
      runAblation({ data, epochs: 2, seeds: 1, out, probeEpochs: 2, base: tiny }).pipe(
        Effect.provide(TensorBackend.layer("wasm")),
      ),
    );
    assert.ok(Exit.isFailure(other));
    assert.match(String(other.cause), /was trained with another budget/);
  } finally {
    await Deno.remove(out, { recursive: true });
  }
});

Deno.test("ablation flags: --data is required, unknown flags and bad numbers fail in one line", () => {
  assert.throws(() => parseAblationArgs([]), /--data SOURCE is required/);
  assert.throws(() => parseAblationArgs(["--data", "x", "--epoch", "2"]), /unknown flag --epoch/);
  assert.throws(() => parseAblationArgs(["--data", "x", "--seeds", "0"]), /--seeds must be an integer >= 1/);
  assert.deepEqual(parseAblationArgs(["--data", "x"]), {
    data: "x",
    epochs: 2,
    seeds: 1,
    out: "runs/ablation",
    probeEpochs: 20,
  });
});

Deno.test("ablation: a cell that would not fit the backend fails before any cell trains", async () => {
  const out = await Deno.makeTempDir({ prefix: "swav-ablation-" });
  try {
    const exit = await Effect.runPromiseExit(
      runAblation({
        data,
        epochs: 1,
        seeds: 1,
        out,
        probeEpochs: 2,
        base: { ...tiny, model: { width: 64, hidden: 2048, out: 128 }, train: { batchSize: 100 * 1024 } },
      }).pipe(Effect.provide(TensorBackend.layer("wasm"))),
    );
    assert.ok(Exit.isFailure(exit));
    assert.match(String(exit.cause), /wasm heap/);
    assert.deepEqual([...Deno.readDirSync(out)], [], "no cell started");
  } finally {
    await Deno.remove(out, { recursive: true });
  }
});
