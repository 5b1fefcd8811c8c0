/** Issue 18: every failure at the CLI edge is one line, defects included; SWAV_DEBUG=1 adds the stack. */
import assert from "node:assert/strict";
import { Effect, Schema } from "effect";
import { reportFailure } from "../cli/report.ts";

class SampleError extends Schema.TaggedError<SampleError>()("SampleError", { message: Schema.String }) {}

/** What reportFailure prints for `effect`, and the exit code it sets. */
const reported = async (effect: Effect.Effect<unknown, unknown>, debug = false) => {
  const lines: string[] = [];
  const original = console.error;
  const previousExit = Deno.exitCode;
  if (debug) Deno.env.set("SWAV_DEBUG", "1");
  console.error = (...args: unknown[]) => lines.push(args.map(String).join(" "));
  try {
    await Effect.runPromise(reportFailure(effect));
    return { text: lines.join("\n"), exitCode: Deno.exitCode };
  } finally {
    console.error = original;
    Deno.exitCode = previousExit;
    Deno.env.delete("SWAV_DEBUG");
  }
};

Deno.test("reportFailure: a typed failure is one line with its tag", async () => {
  const r = await reported(Effect.fail(new SampleError({ message: "what\n  where" })));
  assert.equal(r.text, "error: SampleError: what where");
  assert.equal(r.exitCode, 1);
});

Deno.test("reportFailure: a defect (Effect.die, a thrown exception) is one line too, no stack trace", async () => {
  for (
    const effect of [
      Effect.die(new TypeError("Cannot read properties of undefined (reading '3')")),
      Effect.sync(() => JSON.parse("{")),
      Effect.promise(() => Promise.reject(new RangeError("bad size"))),
    ]
  ) {
    const r = await reported(effect);
    assert.equal(r.exitCode, 1);
    assert.equal(r.text.split("\n").length, 1, r.text);
    assert.match(r.text, /^error: (TypeError|SyntaxError|RangeError): .*SWAV_DEBUG=1/);
    assert.doesNotMatch(r.text, /\n\s+at /);
  }
});

Deno.test("reportFailure: SWAV_DEBUG=1 shows the stack after the line", async () => {
  const r = await reported(Effect.die(new Error("boom")), true);
  assert.match(r.text, /^error: InternalError: boom/);
  assert.match(r.text, /\n\s+at /);
});
