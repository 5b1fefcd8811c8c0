/**
 * The arithmetic precision of a run: `fp32`, `bf16` (mixed precision: oneDNN's
 * convolutions compute on bfloat16 and accumulate in fp32, and in training a
 * ResNet's stem and residual blocks keep their activations and their gradients
 * in bfloat16 between layers, backend/bf16_trunk.ts; the master weights and
 * their gradients, batch-norm statistics, the head, its normalisation,
 * Sinkhorn, the losses, LARC and the queue stay fp32), or `auto`: bf16 where
 * the processor executes it natively, fp32 elsewhere.
 *
 * "Native" is oneDNN's own answer: the instruction set its JIT kernels dispatch
 * to (`dnnl_get_effective_cpu_isa`) holds avx512_core_bf16 (AVX512-BF16, or
 * AMX). Elsewhere oneDNN 2.x emulates bf16 on AVX-512 (slower than fp32) or
 * refuses it (AVX2), so bf16 is never picked there.
 */
import { Schema } from "effect";
import { dnnlDetails } from "./native_probe.ts";
import { loadDnnl } from "./onednn.ts";
import { loadBlas } from "./openblas.ts";

export const PrecisionChoice = Schema.Literals(["fp32", "bf16", "auto"]);
export type PrecisionChoice = typeof PrecisionChoice.Type;
export type Precision = "fp32" | "bf16";

/** Whether bf16 runs natively here, and why (for the run's note and `doctor`). */
export interface Bf16Support {
  readonly native: boolean;
  readonly reason: string;
}

/**
 * oneDNN's answer for this process. `SWAV_BF16_NATIVE=0` answers no whatever the
 * processor (to see the fp32 fallback on a bf16 machine, and for tests).
 */
export const bf16Support = (): Bf16Support => {
  let forced: string | undefined;
  try {
    forced = Deno.env.get("SWAV_BF16_NATIVE");
  } catch {
    forced = undefined;
  }
  if (forced === "0") return { native: false, reason: "SWAV_BF16_NATIVE=0" };
  const dnnl = loadDnnl();
  if (dnnl === undefined) return { native: false, reason: "oneDNN (Debian libdnnl2) is not loaded" };
  if (loadBlas() === undefined) {
    return { native: false, reason: "the native kernels need OpenBLAS too (Debian libopenblas0-pthread)" };
  }
  const { isa, bf16, error } = dnnlDetails(dnnl.library);
  if (bf16 !== true) {
    return {
      native: false,
      reason: error ??
        `oneDNN's instruction set here is ${isa ?? "unknown"}, without bf16 (needs avx512_bf16 or amx)`,
    };
  }
  return { native: true, reason: `oneDNN ${isa}` };
};

/** The precision a run gets, and the one line to print when it differs from the one asked for. */
export interface ResolvedPrecision {
  readonly precision: Precision;
  readonly note?: string;
}

/**
 * `asked` resolved: `auto` takes bf16 only where `support` says native; `bf16`
 * asked for where it is not native runs fp32, with a note saying so. Native
 * kernels run only on the wasm backend (and `auto`, which lands there without
 * a GPU); another backend runs fp32.
 */
export const resolvePrecision = (
  asked: PrecisionChoice,
  backend: string,
  support: () => Bf16Support = bf16Support,
): ResolvedPrecision => {
  if (asked === "fp32") return { precision: "fp32" };
  const onNative = backend === "wasm" || backend === "auto";
  const s = onNative ? support() : { native: false, reason: `the ${backend} backend has no bf16 kernels` };
  if (s.native) return { precision: "bf16" };
  return asked === "bf16"
    ? { precision: "fp32", note: `precision: bf16 asked for but not native here (${s.reason}); running fp32` }
    : { precision: "fp32" };
};
