/**
 * The second round of hostile inputs to the PyTorch checkpoint reader and the other file readers
 * (bench/hostile_checkpoints.ts makes the checkpoints from bytes). On the old reader each of these
 * hung (a zip64 directory, a FIFO), exhausted memory or time (a stride-0 tensor, overlapping zip
 * entries, a LONG4 integer, a shared list in an error message), crashed as an internal error (a
 * faked tensor record), or loaded silently (overlapping entries, sizes that disagree, an entry
 * that inflates past its size). Now each is a typed one-line error, found before anything large
 * is inflated or allocated, or loads within the stated caps.
 */
import assert from "node:assert/strict";
import { Cause, Effect, Exit } from "effect";
import { MAX_CHECKPOINT_BYTES, parseTorchStateDict, readTorchStateDict } from "../data/torch_checkpoint.ts";
import { MAX_OVERLAP_ELEMENTS } from "../data/torch_tensors.ts";
import { readNpy } from "../data/npy.ts";
import { readRawConfig } from "../config/config.ts";
import { isTorchCheckpointFile, loadWeightsFile } from "../pipelines/torch_weights.ts";
import { labelSubset } from "../pipelines/evaluate.ts";
import { subsetFromNames } from "../pipelines/semisup.ts";
import type { DataSource } from "../data/sources.ts";
import { describeFailure } from "../cli/report.ts";
import * as hostile from "../bench/hostile_checkpoints.ts";

/** The error a parse of `bytes` fails with (a typed one, never a defect), and how long it took. */
const refusal = async (bytes: Uint8Array) => {
  const started = performance.now();
  const result = await Effect.runPromise(Effect.result(parseTorchStateDict(bytes, "hostile.pth")));
  const seconds = (performance.now() - started) / 1000;
  assert.equal(result._tag, "Failure", "the file is refused");
  const error = (result as { failure: { _tag: string; message: string } }).failure;
  assert.equal(error._tag, "TorchCheckpointError");
  assert.ok(!error.message.includes("\n"), "one line");
  assert.ok(error.message.length < 700, `a short line (${error.message.length} characters)`);
  return { message: error.message, seconds };
};

const cases: Array<[string, () => Uint8Array, RegExp]> = [
  [
    "a zip64 record that disagrees with the end record (fflate looped forever)",
    hostile.zip64Loop,
    /disagree/,
  ],
  [
    "32 directory entries on one 64 MiB deflated entry (2.43 GB before)",
    () => hostile.overlappingEntries(),
    /shares its bytes/,
  ],
  ["an entry inside another entry's bytes", hostile.nestedEntry, /overlaps/],
  [
    "local and central sizes that disagree",
    hostile.sizesDisagree,
    /sizes differ between the local header and the directory/,
  ],
  [
    "an entry that inflates past its declared size",
    hostile.inflatesPastDeclared,
    /inflates past its declared 8 bytes/,
  ],
  [
    "four torch.zeros(1).expand(2**27) (2.36 GB before)",
    () => hostile.strideZero(),
    /repeats its storage of 1 elements/,
  ],
  [
    "a 1 MB LONG4 integer (quadratic before: minutes)",
    () => hostile.long4(2 ** 20),
    /LONG4 integer of 1048576 bytes/,
  ],
  ["a storage type changed by BUILD", hostile.buildOnStorageType, /malformed/],
];
for (const [name, make, reason] of cases) {
  Deno.test(`hostile checkpoint: ${name} is a one-line error`, async () => {
    const bytes = make();
    const { message, seconds } = await refusal(bytes);
    assert.match(message, reason);
    // Generous: each is refused in milliseconds; the old reader took minutes or never ended.
    assert.ok(seconds < 20, `refused in ${seconds.toFixed(1)} s`);
  });
}

Deno.test("hostile checkpoint: a shape that is a list shared 2^20 times over prints as a short line", async () => {
  // The old message printed the list expanded: 2^21 items for depth 20, without end for depth 40.
  for (const depth of [20, 40]) {
    const { message } = await refusal(hostile.sharedListShape(depth));
    assert.match(message, /malformed shape \[\[\[/);
  }
});

Deno.test("a list dressed as a tensor record by BUILD is not taken for a tensor (no internal error)", async () => {
  const state = await Effect.runPromise(parseTorchStateDict(hostile.fakedTensorRecord(), "faked.pth"));
  assert.equal(state.tensors.size, 0);
  assert.deepEqual(state.skipped, ["w"]);
});

Deno.test("tensors that repeat their storage load within the stated caps", async () => {
  const small = await Effect.runPromise(parseTorchStateDict(hostile.goodSmall()));
  assert.deepEqual([...small.tensors.get("w")!.values], [1, 2, 3]);
  assert.deepEqual(small.tensors.get("e")!.shape, [5]);
  assert.deepEqual([...small.tensors.get("e")!.values], [7, 7, 7, 7, 7]);
  // At the cap, an expanded tensor loads; one element past it, it is refused.
  const atCap = await Effect.runPromise(parseTorchStateDict(hostile.strideZero(1, MAX_OVERLAP_ELEMENTS)));
  const values = atCap.tensors.get("w0")!.values;
  assert.equal(values.length, MAX_OVERLAP_ELEMENTS);
  assert.ok(values.every((v) => v === 0.5));
  const { message } = await refusal(hostile.strideZero(1, MAX_OVERLAP_ELEMENTS + 1));
  assert.match(message, /over the 1048576 elements this reader expands/);
  // Views of one storage: twice its elements plus the overlap allowance, no more.
  const numel = MAX_OVERLAP_ELEMENTS / 2;
  const fits = await Effect.runPromise(parseTorchStateDict(hostile.manyViews(4, numel)));
  assert.equal(fits.tensors.size, 4);
  assert.match((await refusal(hostile.manyViews(5, numel))).message, /reuse their storages over and over/);
});

Deno.test("a faked record or a hostile file through loadWeightsFile is a typed error, not a defect", async () => {
  const folder = await Deno.makeTempDir({ prefix: "swav-hostile-" });
  try {
    for (
      const [name, bytes] of [["faked", hostile.fakedTensorRecord()], ["zip64", hostile.zip64Loop()]] as const
    ) {
      await Deno.writeFile(`${folder}/${name}.pth`, bytes);
      const exit = await Effect.runPromiseExit(loadWeightsFile(`${folder}/${name}.pth`));
      assert.ok(Exit.isFailure(exit));
      assert.notEqual(Cause.findDefect(exit.cause)._tag, "Success", `${name}: no defect`);
      assert.equal(Cause.findError(exit.cause)._tag, "Success", `${name}: a typed error`);
    }
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
});

Deno.test("a FIFO or a device is refused by every reader without opening it", async () => {
  const folder = await Deno.makeTempDir({ prefix: "swav-fifo-" });
  try {
    const fifo = `${folder}/pipe.pth`;
    const made = await new Deno.Command("mkfifo", { args: [fifo] }).output();
    assert.ok(made.success, "mkfifo");
    // Opening the FIFO would block until a writer came: each of these returns at once instead.
    assert.equal(await Effect.runPromise(isTorchCheckpointFile(fifo)), false);
    for (const path of [fifo, "/dev/zero"]) {
      const torch = await Effect.runPromise(Effect.flip(readTorchStateDict(path)));
      assert.match(torch.message, /not a regular file/);
      const config = await Effect.runPromise(Effect.flip(readRawConfig(path)));
      assert.match(config.message, /not a regular file/);
      const npy = await Effect.runPromise(Effect.flip(readNpy(path)));
      assert.match(npy.message, /not a regular file/);
      // --labels FILE: read before the train source is looked at (the old reader reached 13 GB on /dev/zero).
      const labels = await Effect.runPromise(Effect.flip(labelSubset({} as DataSource, 2, path, 1)));
      assert.match(labels.message, /--labels .*not a regular file/);
    }
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
  assert.equal(MAX_CHECKPOINT_BYTES, 4 * 2 ** 30);
});

Deno.test("the --labels error shows binary names escaped and cut, never raw bytes", async () => {
  const names = ["\x1b[2J\x00\x07" + "\xff".repeat(500), "ok.png"];
  const exit = await Effect.runPromise(Effect.flip(subsetFromNames(["a/ok.png"], names, "lab\x1bels.bin")));
  // deno-lint-ignore no-control-regex
  assert.ok(!/[\x00-\x1f\x7f]/.test(exit.message), JSON.stringify(exit.message));
  assert.match(exit.message, /--labels lab\\x1bels\.bin: 1 of 2 names/);
  assert.match(exit.message, /first: \\x1b\[2J\\x00\\x07ÿÿ.*…\)/);
  assert.ok(exit.message.length < 300);
});

Deno.test("an error line is cut at 2000 characters, whatever the message", () => {
  const line = describeFailure(new Error("x".repeat(10_000_000)), false);
  assert.ok(line.length <= 2001, `${line.length} characters`);
  assert.ok(line.endsWith("…"));
});
