/**
 * What an evaluation reads its images through: a SOURCE spec opened with the
 * encoder's channel count, and the test-time resize before the centre crop.
 */
import { Effect } from "effect";
import { evalResizeFor } from "../data/eval_augment.ts";
import { openSource, type SourceKind } from "../data/sources.ts";
import { resolveSourceSpec } from "./sources.ts";

/** Opens a SOURCE spec (built-ins resolved) with the encoder's channel count. */
export const openEvalSource = (spec: string, channels: 1 | 3) =>
  Effect.gen(function* () {
    return yield* openSource(yield* resolveSourceSpec(spec), { channels });
  });

/**
 * The test-time resize: `"auto"` (default) is `evalResizeFor(size)` (Resize(256) before
 * CenterCrop(224), in proportion) for every source; for IDX and CIFAR, whose images already have
 * the crop size, it measured better than no resize on Fashion-MNIST kNN (README, Evaluation).
 * `"none"` crops without resizing beyond the crop size; a number is the shorter side.
 */
export type ResizeOption = "auto" | "none" | number;

/** The shorter side to resize to before the centre crop of `size`, or undefined for none. */
export const evalResizeSide = (option: ResizeOption, size: number, _kind: SourceKind): number | undefined => {
  if (option === "none") return undefined;
  if (typeof option === "number") return option;
  return evalResizeFor(size);
};

/** `--resize auto|none|N` as a value, or undefined when it is none of them. */
export const parseResizeOption = (text: string): ResizeOption | undefined => {
  if (text === "auto" || text === "none") return text;
  return /^[1-9][0-9]*$/.test(text) ? Number(text) : undefined;
};
