/**
 * Committed checkpoint files (test/fixtures/checkpoints/, written byte by
 * byte by reference/golden_checkpoints.py, not by the project's writer) keep
 * loading: names, shapes, dtypes and every value, recomputed here from the
 * generator's formula. A format change that the writer and the reader make
 * together (a renamed dtype label, say) passes every round-trip test and
 * fails here, as files from earlier builds would fail to load.
 *
 * Then each malformed header is one clear line naming the file and the field.
 */
import assert from "node:assert/strict";
import { Cause, Effect, Exit } from "effect";
import { decodeCheckpoint, encodeCheckpoint, readCheckpoint } from "../pipelines/checkpoint.ts";

const folder = new URL("./fixtures/checkpoints/", import.meta.url).pathname;

/** What reference/golden_checkpoints.py wrote: (name, shape, dtype) in order. */
const tensors: readonly [string, number[], "float32" | "int32"][] = [
  ["backbone.conv1.weight", [2, 3, 3, 1], "float32"],
  ["backbone.bn1.num_batches_tracked", [], "int32"],
  ["projection.0.bias", [3], "float32"],
  ["prototypes.weight", [5, 3], "float32"],
  ["optimiser/backbone.conv1.weight", [2, 3, 3, 1], "float32"],
  ["optimiser/prototypes.weight", [5, 3], "float32"],
  ["queue/0", [4, 3], "float32"],
  ["queue/1", [4, 3], "float32"],
];

/** The generator's `value(t, i, dtype)`. */
const value = (t: number, i: number, dtype: string): number =>
  dtype === "int32" ? ((i * 7 + t * 13) % 23) - 1000 : (((i * 7 + t * 13) % 23) - 11) / 8;

const read = async (name: string) => {
  const warnings: string[] = [];
  const checkpoint = await Effect.runPromise(
    readCheckpoint(`${folder}${name}`, { onWarning: (message) => warnings.push(message) }),
  );
  return { checkpoint, warnings };
};

for (const [file, checksum] of [["v1-checksum.swav", true], ["v1-no-checksum.swav", false]] as const) {
  Deno.test(`golden checkpoint ${file}: names, shapes, dtypes and values load exactly`, async () => {
    const { checkpoint, warnings } = await read(file);
    assert.equal(checkpoint.step, 12);
    assert.equal(checkpoint.epoch, 3);
    assert.equal(checkpoint.batchInEpoch, 2);
    assert.deepEqual(checkpoint.config, {
      train: { seed: 7, batchSize: 4 },
      swav: { cropsForAssign: [0, 1] },
    });
    assert.deepEqual(checkpoint.extra, {
      seed: 7,
      backend: "wasm",
      queue: { length: 4, batchSize: 2, dim: 3, cropsForAssign: [0, 1], filled: 4 },
    });
    assert.deepEqual(checkpoint.arrays.map((a) => a.name), tensors.map(([name]) => name));
    checkpoint.arrays.forEach((array, t) => {
      const [name, shape, dtype] = tensors[t]!;
      assert.deepEqual(array.shape, shape, name);
      assert.ok(
        dtype === "int32" ? array.values instanceof Int32Array : array.values instanceof Float32Array,
        `${name}: ${array.values.constructor.name}, expected ${dtype}`,
      );
      const want = Array.from({ length: shape.reduce((a, b) => a * b, 1) }, (_, i) => value(t, i, dtype));
      assert.deepEqual(Array.from(array.values), want, name);
    });
    if (checksum) assert.deepEqual(warnings, []);
    else assert.match(warnings.join("\n"), /v1-no-checksum\.swav has no payload checksum/);
  });
}

Deno.test("the writer still writes the golden file byte for byte", async () => {
  const { checkpoint } = await read("v1-checksum.swav");
  const golden = await Deno.readFile(`${folder}v1-checksum.swav`);
  assert.deepEqual(encodeCheckpoint(checkpoint), golden);
});

/** Header JSON and payload of the golden file, and bytes from a patched header (or raw header text). */
const golden = Deno.readFileSync(`${folder}v1-checksum.swav`);
const headerLength = new DataView(golden.buffer).getUint32(12, true);
const header = JSON.parse(new TextDecoder().decode(golden.subarray(16, 16 + headerLength)));
const payload = golden.subarray(16 + headerLength);
// deno-lint-ignore no-explicit-any -- the header JSON is patched freely, including into invalid shapes
const withHeader = (patch: (h: Record<string, any>) => unknown, raw?: string): Uint8Array => {
  const h = structuredClone(header);
  patch(h);
  const text = new TextEncoder().encode(raw ?? JSON.stringify(h));
  const length = Math.ceil(text.length / 4) * 4;
  const out = new Uint8Array(16 + length + payload.length);
  out.set(golden.subarray(0, 16));
  new DataView(out.buffer).setUint32(12, length, true);
  out.fill(0x20, 16, 16 + length);
  out.set(text, 16);
  out.set(payload, 16 + length);
  return out;
};

/** The one message `bytes` fail with (the test fails when they decode). */
const failure = (bytes: Uint8Array): string => {
  const exit = Effect.runSyncExit(decodeCheckpoint(bytes, "run/checkpoint-12.swav", { onWarning: () => {} }));
  assert.ok(Exit.isFailure(exit), "a malformed checkpoint decoded");
  return (Cause.squash(exit.cause) as Error).message;
};

Deno.test("a malformed header is one line naming the file and the field", async (t) => {
  const cases: [string, Uint8Array, RegExp][] = [
    ["truncated header", golden.subarray(0, 100), /truncated header: the file has 100 bytes/],
    [
      "corrupt header JSON",
      withHeader(() => {}, JSON.stringify(header).slice(0, -9) + "}"),
      /corrupt header: .*JSON/,
    ],
    [
      "checksum not an object",
      withHeader((h) => (h.checksum = "abc")),
      /invalid header: checksum: Expected object/,
    ],
    [
      "checksum without its digest",
      withHeader((h) => delete h.checksum.payload),
      /invalid header: checksum\.payload: Missing key/,
    ],
    [
      "checksum of another algorithm",
      withHeader((h) => (h.checksum.algorithm = "md5")),
      /invalid header: checksum\.algorithm: Expected "sha256"/,
    ],
    [
      "checksum digest not hex",
      withHeader((h) => (h.checksum.payload = "xyz")),
      /invalid header: checksum\.payload: /,
    ],
    [
      "empty tensor name",
      withHeader((h) => (h.tensors[2].name = "")),
      /invalid header: tensors\[2\]\.name: /,
    ],
    [
      "negative dimension",
      withHeader((h) => (h.tensors[3].shape = [-5, -3])),
      /invalid header: tensors\[3\]\.shape\[0\]: .*; tensors\[3\]\.shape\[1\]: /,
    ],
    ["missing step", withHeader((h) => delete h.step), /invalid header: step: Missing key/],
    ["missing tensor table", withHeader((h) => delete h.tensors), /invalid header: tensors: Missing key/],
    [
      "tensor without its dtype",
      withHeader((h) => delete h.tensors[1].dtype),
      /invalid header: tensors\[1\]\.dtype: Missing key/,
    ],
    [
      "JSON version not the file's",
      withHeader((h) => (h.version = 2)),
      /invalid header: version: Expected 1/,
    ],
    ["header not an object", withHeader(() => {}, "[1, 2]"), /invalid header: Expected object/],
  ];
  for (const [label, bytes, expected] of cases) {
    await t.step(label, () => {
      const message = failure(bytes);
      assert.ok(!message.includes("\n"), `${label}: more than one line: ${JSON.stringify(message)}`);
      assert.match(message, /^checkpoint run\/checkpoint-12\.swav: /, label);
      assert.match(message, expected, label);
    });
  }
});
