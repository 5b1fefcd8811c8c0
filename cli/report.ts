/** How every command reports a failure: one line naming the problem on stderr, exit code 1. */
import { Effect } from "effect";

/** Prints an error's message on one line (tag first) and sets exit code 1; never a stack trace. */
export const reportFailure = <A, E, R>(effect: Effect.Effect<A, E, R>) =>
  effect.pipe(
    Effect.catch((error: unknown) =>
      Effect.sync(() => {
        const message = error instanceof Error ? error.message : String(error);
        const tag = typeof error === "object" && error !== null && "_tag" in error
          ? `${String(error._tag)}: `
          : "";
        // One line, all of it: schema errors put the offending field's path on a second line.
        console.error(`error: ${tag}${message.trim().replace(/\s*\n\s*/g, " ")}`);
        Deno.exitCode = 1;
      })
    ),
  );
