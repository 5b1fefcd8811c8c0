import assert from "node:assert/strict";
import { optionalTest, PYTHON } from "./_optional.ts";
import { Effect } from "effect";
import { decodeNpy, encodeNpy, NpyError, type NpyValues, readNpy } from "../data/npy.ts";

const fixtures = new URL("./fixtures/npy/", import.meta.url).pathname;
const expected: Record<string, { dtype: string; shape: number[]; values: number[] }> = JSON.parse(
  await Deno.readTextFile(`${fixtures}expected.json`),
);

const asNumbers = (values: NpyValues): number[] => Array.from(values as ArrayLike<number | bigint>, Number);

Deno.test("npy: reads the files NumPy wrote (fixtures from reference/npy_reference.py)", async (t) => {
  for (const [name, want] of Object.entries(expected)) {
    await t.step(name, async () => {
      const got = await Effect.runPromise(readNpy(`${fixtures}${name}.npy`));
      assert.deepEqual([...got.shape], want.shape);
      assert.equal(got.dtype.slice(1), want.dtype.slice(1));
      // Exact: float32 values printed by NumPy as doubles round-trip through Math.fround.
      assert.deepEqual(asNumbers(got.values), want.values);
    });
  }
});

Deno.test("npy: round trip of fresh random arrays of every dtype, data 64-byte aligned", () => {
  const n = 1 + Math.floor(Math.random() * 50);
  const d = 1 + Math.floor(Math.random() * 9);
  const cases: [NpyValues, number[]][] = [
    [Float32Array.from({ length: n * d }, () => Math.random() * 2 - 1), [n, d]],
    [Float64Array.from({ length: n * d * 2 }, () => Math.random()), [n, d, 2]],
    [Int32Array.from({ length: n }, () => Math.floor(Math.random() * 2 ** 31)), [n]],
    [BigInt64Array.from({ length: n }, () => BigInt(Math.floor(Math.random() * 1e6) - 1)), [n]],
    [Uint8Array.from({ length: n }, () => Math.floor(Math.random() * 256)), [n]],
    [new Float32Array(0), [0, d]],
  ];
  for (const [values, shape] of cases) {
    const bytes = Effect.runSync(encodeNpy(values, shape));
    const headerLength = new DataView(bytes.buffer).getUint16(8, true);
    assert.equal((10 + headerLength) % 64, 0, "data offset is 64-byte aligned");
    assert.equal(bytes[10 + headerLength - 1], 0x0a, "header ends with a newline");
    const back = Effect.runSync(decodeNpy(bytes));
    assert.deepEqual([...back.shape], shape);
    assert.equal(back.values.constructor, values.constructor);
    assert.deepEqual(asNumbers(back.values), asNumbers(values));
  }
});

Deno.test("npy: bad input fails with a clear NpyError", () => {
  const good = Effect.runSync(encodeNpy(new Float32Array([1, 2, 3]), [3]));
  assert.throws(() => Effect.runSync(decodeNpy(new TextEncoder().encode("PK\x03\x04 zip"))), /bad magic/);
  assert.throws(() => Effect.runSync(decodeNpy(good.subarray(0, good.length - 2))), /truncated data/);
  assert.throws(() => Effect.runSync(encodeNpy(new Float32Array(5), [2, 3])), NpyError);
  const fortran = Effect.runSync(encodeNpy(new Float32Array(4), [2, 2]));
  const patched = new Uint8Array(fortran);
  patched.set(new TextEncoder().encode("True "), new TextDecoder("latin1").decode(fortran).indexOf("False"));
  assert.throws(() => Effect.runSync(decodeNpy(patched)), /Fortran/);
  const complex = new Uint8Array(good);
  complex.set(new TextEncoder().encode("<c8"), new TextDecoder("latin1").decode(good).indexOf("<f4"));
  assert.throws(() => Effect.runSync(decodeNpy(complex)), /dtype <c8 is not supported/);
});

optionalTest(
  "npy: NumPy reads what we write (features float32 [N, D], labels int64 [N])",
  ["numpy"],
  async () => {
    const folder = await Deno.makeTempDir({ prefix: "swav-npy-" });
    try {
      const features = Float32Array.from({ length: 12 }, () => Math.random() - 0.5);
      const labels = BigInt64Array.from([3n, -1n, 7n]);
      await Deno.writeFile(`${folder}/f.npy`, Effect.runSync(encodeNpy(features, [3, 4])));
      await Deno.writeFile(`${folder}/l.npy`, Effect.runSync(encodeNpy(labels, [3])));
      const script = [
        "import json, sys, numpy as np",
        `f = np.load(sys.argv[1] + '/f.npy'); l = np.load(sys.argv[1] + '/l.npy')`,
        "print(json.dumps({'f': [f.dtype.str, list(f.shape), f.ravel().tolist()],",
        "                  'l': [l.dtype.str, list(l.shape), l.tolist()]}))",
      ].join("\n");
      const out = await new Deno.Command(PYTHON, { args: ["-c", script, folder] }).output();
      assert.ok(out.success, new TextDecoder().decode(out.stderr));
      const got = JSON.parse(new TextDecoder().decode(out.stdout));
      assert.deepEqual(got.f, ["<f4", [3, 4], Array.from(features)]);
      assert.deepEqual(got.l, ["<i8", [3], [3, -1, 7]]);
    } finally {
      await Deno.remove(folder, { recursive: true });
    }
  },
);
