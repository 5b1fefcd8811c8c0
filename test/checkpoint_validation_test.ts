/**
 * Issue 18: a checkpoint's header is validated by its schema and its payload
 * by a checksum before anything is loaded; a run folder falls back to the
 * newest checkpoint that verifies.
 */
import assert from "node:assert/strict";
import { Effect, Exit } from "effect";
import {
  type Checkpoint,
  checkpointFileName,
  encodeCheckpoint,
  readCheckpoint,
  writeCheckpoint,
} from "../pipelines/checkpoint.ts";
import * as checkpoints from "../pipelines/checkpoint.ts";

const sample = (step: number): Checkpoint => ({
  step,
  epoch: 1,
  batchInEpoch: 2,
  config: { seed: 1 },
  extra: {},
  arrays: [
    { name: "a.weight", shape: [2, 3], values: Float32Array.from([1, 2, 3, 4, 5, 6]) },
    { name: "b.weight", shape: [4], values: Float32Array.from([7, 8, 9, 10]) },
    { name: "c.count", shape: [2], values: Int32Array.from([3, -1]) },
  ],
});

/** Header and payload of checkpoint bytes, and the bytes back from a (patched) header. */
const split = (bytes: Uint8Array) => {
  const headerLength = new DataView(bytes.buffer, bytes.byteOffset).getUint32(12, true);
  const header = JSON.parse(new TextDecoder().decode(bytes.subarray(16, 16 + headerLength)));
  return { header, payload: bytes.subarray(16 + headerLength) };
};
const join = (header: unknown, payload: Uint8Array): Uint8Array => {
  const text = new TextEncoder().encode(JSON.stringify(header));
  const headerLength = Math.ceil(text.length / 4) * 4;
  const out = new Uint8Array(16 + headerLength + payload.length);
  out.set(new TextEncoder().encode("SWAVCKPT"));
  new DataView(out.buffer).setUint32(8, 1, true);
  new DataView(out.buffer).setUint32(12, headerLength, true);
  out.fill(0x20, 16, 16 + headerLength);
  out.set(text, 16);
  out.set(payload, 16 + headerLength);
  return out;
};

const withFolder = async (body: (folder: string) => Promise<void>) => {
  const folder = await Deno.makeTempDir({ prefix: "swav-ckpt-" });
  try {
    await body(folder);
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
};

/** readCheckpoint's failure for `bytes` (the test fails when it loads). */
const failureOf = async (folder: string, bytes: Uint8Array): Promise<string> => {
  await Deno.writeFile(`${folder}/bad.swav`, bytes);
  const exit = await Effect.runPromiseExit(readCheckpoint(`${folder}/bad.swav`));
  assert.ok(Exit.isFailure(exit), "a bad checkpoint loaded");
  return String(exit.cause);
};

Deno.test("checkpoint header: each bad field is rejected with a CheckpointError naming it", async (t) => {
  await withFolder(async (folder) => {
    const { header, payload } = split(encodeCheckpoint(sample(3)));
    const cases: Array<[string, (h: typeof header) => void, RegExp]> = [
      ["step abc", (h) => (h.step = "abc"), /CheckpointError.*step/s],
      ["negative step", (h) => (h.step = -1), /CheckpointError.*step/s],
      ["fractional epoch", (h) => (h.epoch = 1.5), /CheckpointError.*epoch/s],
      ["negative batchInEpoch", (h) => (h.batchInEpoch = -2), /CheckpointError.*batchInEpoch/s],
      ["negative offset", (h) => (h.tensors[1].offset = -4), /CheckpointError.*offset/s],
      ["misaligned offset", (h) => (h.tensors[1].offset += 1), /CheckpointError.*not 4-byte aligned/s],
      ["float64 dtype", (h) => (h.tensors[1].dtype = "float64"), /CheckpointError.*dtype/s],
      ["length not the shape's", (h) => (h.tensors[0].length = 5), /CheckpointError.*holds 6/s],
      ["overlapping tensors", (h) => (h.tensors[1].offset = 8), /CheckpointError.*overlap/s],
      ["offset past the file", (h) => (h.tensors[2].offset = 1 << 30), /CheckpointError.*truncated payload/s],
      ["duplicate name", (h) => (h.tensors[1].name = "a.weight"), /CheckpointError.*twice/s],
    ];
    for (const [label, patch, expected] of cases) {
      await t.step(label, async () => {
        const h = structuredClone(header);
        patch(h);
        assert.match(await failureOf(folder, join(h, payload)), expected);
      });
    }
  });
});

Deno.test("checkpoint payload: a flipped byte fails the checksum; a file without one loads with a warning", async () => {
  await withFolder(async (folder) => {
    const bytes = encodeCheckpoint(sample(3));
    const { header, payload } = split(bytes);
    assert.equal(header.checksum?.algorithm, "sha256");
    const damaged = bytes.slice();
    damaged[damaged.length - 5]! ^= 0x10;
    assert.match(await failureOf(folder, damaged), /CheckpointError.*checksum mismatch/s);
    // A version-1 file written before the checksum existed.
    const old = structuredClone(header);
    delete old.checksum;
    await Deno.writeFile(`${folder}/old.swav`, join(old, payload));
    const warnings: string[] = [];
    const loaded = await Effect.runPromise(
      readCheckpoint(`${folder}/old.swav`, { onWarning: (message: string) => warnings.push(message) }),
    );
    assert.deepEqual(Array.from(loaded.arrays[1]!.values), [7, 8, 9, 10]);
    assert.match(warnings.join("\n"), /old\.swav has no payload checksum/);
  });
});

Deno.test("checkpoint reader: only regular files, sized before reading", async () => {
  await withFolder(async (folder) => {
    // /dev/zero would grow without end; a FIFO would block for ever.
    assert.match(await failureOf(folder, new Uint8Array(0)), /CheckpointError.*bad magic/s);
    const exit = await Effect.runPromiseExit(readCheckpoint("/dev/zero"));
    assert.ok(Exit.isFailure(exit));
    assert.match(String(exit.cause), /not a regular file/);
  });
});

Deno.test("a run folder falls back to the newest checkpoint that verifies, naming the damaged one", async () => {
  await withFolder(async (folder) => {
    for (const step of [2, 4, 6]) await Effect.runPromise(writeCheckpoint(folder, sample(step)));
    const newest = `${folder}/${checkpointFileName(6)}`;
    const bytes = await Deno.readFile(newest);
    await Deno.writeFile(newest, bytes.subarray(0, bytes.length - 12));
    const warnings: string[] = [];
    const found = await Effect.runPromise(
      checkpoints.readCheckpointAt(folder, { onWarning: (message: string) => warnings.push(message) }),
    );
    assert.equal(found.path, `${folder}/${checkpointFileName(4)}`);
    assert.equal(found.checkpoint.step, 4);
    assert.match(warnings.join("\n"), new RegExp(`${checkpointFileName(6)}.*truncated payload.*older`));
    // Every checkpoint damaged: one error naming each.
    for (const step of [2, 4]) {
      await Deno.writeFile(`${folder}/${checkpointFileName(step)}`, new Uint8Array(20));
    }
    const exit = await Effect.runPromiseExit(checkpoints.readCheckpointAt(folder));
    assert.ok(Exit.isFailure(exit));
    assert.match(String(exit.cause), /every checkpoint is damaged.*000000006.*000000004.*000000002/s);
  });
});
