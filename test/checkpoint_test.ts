import assert from "node:assert/strict";
import { Effect, Exit } from "effect";
import {
  type Checkpoint,
  checkpointFileName,
  decodeCheckpoint,
  encodeCheckpoint,
  latestCheckpoint,
  readCheckpoint,
  resolveCheckpointPath,
  writeCheckpoint,
} from "../pipelines/checkpoint.ts";

const randomCheckpoint = (step: number): Checkpoint => ({
  step,
  epoch: 3,
  batchInEpoch: 7,
  config: { model: { arch: "resnet18" }, seed: 42 },
  extra: { rng: [1, 2, 3, 4] },
  arrays: [
    { name: "a.weight", shape: [3, 5], values: Float32Array.from({ length: 15 }, () => Math.random()) },
    { name: "b.count", shape: [2], values: Int32Array.from([7, -3]) },
    { name: "c.empty", shape: [0], values: new Float32Array(0) },
  ],
});

Deno.test("checkpoint round trip preserves every array bit for bit", () => {
  const original = randomCheckpoint(12);
  const decoded = Effect.runSync(decodeCheckpoint(encodeCheckpoint(original), "memory"));
  assert.equal(decoded.step, 12);
  assert.equal(decoded.epoch, 3);
  assert.equal(decoded.batchInEpoch, 7);
  assert.deepEqual(decoded.config, original.config);
  assert.deepEqual(decoded.extra, original.extra);
  assert.equal(decoded.arrays.length, original.arrays.length);
  original.arrays.forEach((array, i) => {
    assert.equal(decoded.arrays[i]!.name, array.name);
    assert.deepEqual(decoded.arrays[i]!.shape, array.shape);
    assert.deepEqual(decoded.arrays[i]!.values, array.values);
  });
});

/** The decode failure's message (the test fails when it decodes). */
const decodeFailure = (bytes: Uint8Array, path: string): string => {
  const exit = Effect.runSyncExit(decodeCheckpoint(bytes, path, { onWarning: () => {} }));
  assert.ok(Exit.isFailure(exit), `${path} decoded`);
  return String(exit.cause);
};

Deno.test("corrupt or truncated checkpoints give a CheckpointError naming the file", () => {
  const bytes = encodeCheckpoint(randomCheckpoint(1));
  assert.match(decodeFailure(bytes.subarray(0, bytes.length - 8), "x.swav"), /x\.swav: truncated payload/);
  assert.match(decodeFailure(new TextEncoder().encode("not a checkpoint at all"), "y.swav"), /bad magic/);
  const wrongVersion = bytes.slice();
  new DataView(wrongVersion.buffer).setUint32(8, 99, true);
  assert.match(decodeFailure(wrongVersion, "z.swav"), /version 99/);
});

Deno.test("atomic write: a write interrupted before rename leaves the previous checkpoint the latest and loadable", async () => {
  const folder = await Deno.makeTempDir();
  try {
    await Effect.runPromise(writeCheckpoint(folder, randomCheckpoint(5)));
    // Simulate a process killed mid-write of the next checkpoint: only a partial temp file exists.
    const partial = encodeCheckpoint(randomCheckpoint(6)).subarray(0, 100);
    await Deno.writeFile(`${folder}/${checkpointFileName(6)}.abc.tmp`, partial);
    const latest = await Effect.runPromise(latestCheckpoint(folder));
    assert.equal(latest, `${folder}/${checkpointFileName(5)}`);
    const loaded = await Effect.runPromise(readCheckpoint(latest!));
    assert.equal(loaded.step, 5);
    assert.equal(await Effect.runPromise(resolveCheckpointPath(folder)), latest);
    // No temp files are left behind by a completed write.
    await Effect.runPromise(writeCheckpoint(folder, randomCheckpoint(7)));
    const names = [...Deno.readDirSync(folder)].map((e) => e.name).filter((n) => n.endsWith(".tmp"));
    assert.deepEqual(names, [`${checkpointFileName(6)}.abc.tmp`]);
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
});

Deno.test("resolving a missing path or an empty folder fails with a clear message", async () => {
  const folder = await Deno.makeTempDir();
  try {
    const empty = await Effect.runPromiseExit(resolveCheckpointPath(folder));
    assert.ok(Exit.isFailure(empty));
    assert.match(String(empty.cause), /holds no checkpoint/);
    const missing = await Effect.runPromiseExit(resolveCheckpointPath(`${folder}/nope`));
    assert.ok(Exit.isFailure(missing));
    assert.match(String(missing.cause), /no such file or folder/);
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
});
