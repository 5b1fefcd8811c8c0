/**
 * One oneDNN engine and stream with the helpers every primitive needs (memory
 * descriptors by strides, memory objects, primitive descriptors, exec
 * arguments), shared by the convolutions (backend/onednn.ts) and batch
 * normalisation (backend/onednn_batch_norm.ts).
 */
import { kernelInvariant } from "./invariant.ts";
import {
  DNNL_CPU,
  DNNL_F32,
  DNNL_STREAM_DEFAULT,
  type dnnlSymbols,
  MEMORY_DESC_BYTES,
} from "./onednn_ffi.ts";

export type DnnlSymbols = Deno.DynamicLibrary<typeof dnnlSymbols>["symbols"];

export interface DnnlContext {
  readonly d: DnnlSymbols;
  readonly engine: Deno.PointerValue;
  readonly stream: Deno.PointerValue;
  /** Throws (a kernel invariant) unless `status` is dnnl_success. */
  ok(status: number, what: string): void;
  slot(): BigUint64Array;
  ptr(view: ArrayBufferView): Deno.PointerValue;
  handle(s: BigUint64Array): Deno.PointerValue;
  dims(values: readonly number[]): BigInt64Array;
  /** A memory descriptor of `type` (f32 unless given) by logical dims and strides. */
  memoryDesc(logical: number[], strides: number[], type?: number): Uint8Array;
  /** A memory object on `md` with no data handle yet. */
  memory(md: Uint8Array): Deno.PointerValue;
  /** A primitive descriptor for `desc`; `attr` carries post-ops (none when omitted). */
  primitiveDesc(desc: Uint8Array, hint: Deno.PointerValue, attr?: Deno.PointerValue): Deno.PointerValue;
  primitive(pd: Deno.PointerValue): Deno.PointerValue;
  /** Exec args `{id, memory}` (16 bytes each with padding). */
  execArgs(pairs: readonly (readonly [number, Deno.PointerValue])[]): BigUint64Array;
}

export const makeDnnlContext = (d: DnnlSymbols): DnnlContext => {
  const ok = (status: number, what: string) => {
    kernelInvariant(status === 0, () => `${what} failed with dnnl status ${status}`);
  };
  const slot = () => new BigUint64Array(1);
  const ptr = (view: ArrayBufferView) => Deno.UnsafePointer.of(view as unknown as BufferSource);
  const handle = (s: BigUint64Array) => Deno.UnsafePointer.create(s[0]!);
  const engineSlot = slot();
  ok(d.dnnl_engine_create(ptr(engineSlot), DNNL_CPU, 0n), "dnnl_engine_create");
  const engine = handle(engineSlot);
  const streamSlot = slot();
  ok(d.dnnl_stream_create(ptr(streamSlot), engine, DNNL_STREAM_DEFAULT), "dnnl_stream_create");
  const stream = handle(streamSlot);
  const dims = (values: readonly number[]) => BigInt64Array.from(values.map(BigInt));
  return {
    d,
    engine,
    stream,
    ok,
    slot,
    ptr,
    handle,
    dims,
    memoryDesc: (logical, strides, type = DNNL_F32) => {
      const md = new Uint8Array(MEMORY_DESC_BYTES);
      ok(
        d.dnnl_memory_desc_init_by_strides(ptr(md), 4, ptr(dims(logical)), type, ptr(dims(strides))),
        "dnnl_memory_desc_init_by_strides",
      );
      return md;
    },
    memory: (md) => {
      const s = slot();
      ok(d.dnnl_memory_create(ptr(s), ptr(md), engine, null), "dnnl_memory_create");
      return handle(s);
    },
    primitiveDesc: (desc, hint, attr = null) => {
      const s = slot();
      ok(d.dnnl_primitive_desc_create(ptr(s), ptr(desc), attr, engine, hint), "dnnl_primitive_desc_create");
      return handle(s);
    },
    primitive: (pd) => {
      const s = slot();
      ok(d.dnnl_primitive_create(ptr(s), pd), "dnnl_primitive_create");
      return handle(s);
    },
    execArgs: (pairs) => {
      const args = new BigUint64Array(2 * pairs.length);
      const ints = new Int32Array(args.buffer);
      pairs.forEach(([id, memory], i) => {
        ints[i * 4] = id;
        args[i * 2 + 1] = BigInt(Deno.UnsafePointer.value(memory));
      });
      return args;
    },
  };
};
