/**
 * Weights that cannot be right are refused where they are read, naming the
 * tensor: a NaN or an infinity anywhere, or a negative batch-norm running
 * variance (a variance is never negative; normalising with one gives NaN or
 * nonsense features). Such a file once gave `eval` exit 0 and "top-1 50.00%".
 */
import type { NamedArray } from "../models/model.ts";

/** The first impossible value in `arrays`, as words naming the tensor (by `keyOf`, the file's key), or undefined. */
export const impossibleValue = (
  arrays: readonly NamedArray[],
  keyOf: (name: string) => string = (name) => name,
): string | undefined => {
  for (const array of arrays) {
    const variance = /(^|\.)(running_var|moving_variance)$/.test(array.name);
    const { values } = array;
    for (let i = 0; i < values.length; i++) {
      const x = values[i]!;
      if (!Number.isFinite(x)) {
        return `tensor ${keyOf(array.name)} holds ${x} at index ${i} (of ${values.length} values)`;
      }
      if (variance && x < 0) {
        return `tensor ${keyOf(array.name)} (a batch-norm running variance) holds the negative value ${x} ` +
          `at index ${i}`;
      }
    }
  }
  return undefined;
};
