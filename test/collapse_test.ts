import assert from "node:assert/strict";
import { collapseWarning } from "../pipelines/collapse.ts";

const settings = { prototypes: 30, freezePrototypesIters: 5 };
const logK = Math.log(30);

Deno.test("collapseWarning: silent while the prototypes are (nearly) frozen, and when training is healthy", () => {
  assert.equal(collapseWarning(25, logK, 1, settings), undefined, "step <= freeze + 20");
  assert.equal(collapseWarning(26, logK - 1, 20, settings), undefined);
});

Deno.test("collapseWarning: names a loss stuck near ln K, few prototypes in use, or both", () => {
  const stuck = collapseWarning(26, logK, 20, settings)!;
  assert.match(
    stuck,
    /^training looks collapsed at step 26: loss 3\.401 is stuck near ln K = 3\.401\. Remedies/,
  );
  const few = collapseWarning(26, 1, 1, settings)!;
  assert.match(few, /at step 26: only 1 prototypes in use\. Remedies/);
  const both = collapseWarning(30, logK, 1, settings)!;
  assert.match(both, /stuck near ln K = 3\.401; only 1 prototypes in use/);
  // "few" is at most min(4, K / 20), at least 1: K = 3000 -> 4.
  assert.ok(collapseWarning(400, 1, 4, { prototypes: 3000, freezePrototypesIters: 313 }) !== undefined);
  assert.equal(collapseWarning(400, 1, 5, { prototypes: 3000, freezePrototypesIters: 313 }), undefined);
});
