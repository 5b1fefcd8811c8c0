/**
 * Can oneDNN run bf16 convolutions on this processor? Creates the same convolution
 * forward primitive descriptor (8x16x16x16 input, 32 3x3 filters, formats left to
 * oneDNN) in f32 and in bf16 and prints oneDNN's status for each (0: supported,
 * 3: dnnl_unimplemented). Debian's oneDNN 2.x implements bf16 only on AVX-512
 * (avx512_core and up); on an AVX2-only CPU the bf16 descriptor is refused.
 *
 *   npx deno run -A bench/bf16_probe.ts
 */
import {
  DNNL_CONVOLUTION_DIRECT,
  DNNL_CPU,
  DNNL_F32,
  DNNL_FORMAT_TAG_ANY,
  DNNL_FORWARD_TRAINING,
  dnnlSymbols,
  MEMORY_DESC_BYTES,
  OP_DESC_BYTES,
} from "../backend/onednn_ffi.ts";

const DNNL_BF16 = 2;
const lib = Deno.dlopen("libdnnl.so.2", dnnlSymbols);
const d = lib.symbols;
const ptr = (view: ArrayBufferView) => Deno.UnsafePointer.of(view as unknown as BufferSource);
const dims = (values: readonly number[]) => BigInt64Array.from(values.map(BigInt));
const engineSlot = new BigUint64Array(1);
if (d.dnnl_engine_create(ptr(engineSlot), DNNL_CPU, 0n) !== 0) throw new Error("dnnl_engine_create failed");
const engine = Deno.UnsafePointer.create(engineSlot[0]!);
const flags = (() => {
  try {
    return [
      ...new Set(Deno.readTextFileSync("/proc/cpuinfo").match(/\b(avx512[a-z0-9_]*|amx[a-z0-9_]*)\b/g)),
    ];
  } catch {
    return [];
  }
})();
console.log(`cpu flags: ${flags.length === 0 ? "no avx512 / amx" : flags.join(" ")}`);
for (const [name, type] of [["f32", DNNL_F32], ["bf16", DNNL_BF16]] as const) {
  const md = (logical: number[]) => {
    const out = new Uint8Array(MEMORY_DESC_BYTES);
    d.dnnl_memory_desc_init_by_tag(ptr(out), 4, ptr(dims(logical)), type, DNNL_FORMAT_TAG_ANY);
    return out;
  };
  const [src, weights, dst] = [md([8, 16, 16, 16]), md([32, 16, 3, 3]), md([8, 32, 16, 16])];
  const desc = new Uint8Array(OP_DESC_BYTES);
  const init = d.dnnl_dilated_convolution_forward_desc_init(
    ptr(desc),
    DNNL_FORWARD_TRAINING,
    DNNL_CONVOLUTION_DIRECT,
    ptr(src),
    ptr(weights),
    null,
    ptr(dst),
    ptr(dims([1, 1])),
    ptr(dims([0, 0])),
    ptr(dims([1, 1])),
    ptr(dims([1, 1])),
  );
  const pd = new BigUint64Array(1);
  const status = d.dnnl_primitive_desc_create(ptr(pd), ptr(desc), null, engine, null);
  console.log(
    `${name} convolution: descriptor ${init}, primitive descriptor ${status}${
      status === 3 ? " (unimplemented)" : ""
    }`,
  );
}
