/**
 * How every command reports a failure: one line naming the problem on stderr,
 * exit code 1, never a stack trace: typed failures, defects (`Effect.die`, an
 * unexpected exception) and several failures at once alike. `SWAV_DEBUG=1`
 * adds the full cause with its stack traces after the line.
 */
import { Cause, Effect } from "effect";

const debugEnabled = (): boolean => {
  try {
    return Deno.env.get("SWAV_DEBUG") === "1";
  } catch {
    return false;
  }
};

/** The longest error line printed: a message built from a hostile file's content is cut here. */
const MAX_LINE = 2000;

/** One line, all of it (schema errors put the offending field's path on a second line), cut at `MAX_LINE`. */
const oneLine = (text: string) => {
  const line = text.slice(0, 4 * MAX_LINE).trim().replace(/\s*\n\s*/g, " ");
  return line.length > MAX_LINE ? `${line.slice(0, MAX_LINE)}…` : line;
};

/** The line for one failure or defect: `Tag: message`. */
export const describeFailure = (error: unknown, defect: boolean): string => {
  const message = error instanceof Error ? error.message : String(error);
  const tagged = typeof error === "object" && error !== null && "_tag" in error;
  const tag = tagged ? `${String((error as { _tag: unknown })._tag)}: ` : "";
  if (!defect) return `${tag}${oneLine(message)}`;
  const name = error instanceof Error && error.name !== "Error" ? error.name : "InternalError";
  return `${tagged ? tag : `${name}: `}${oneLine(message)} (an internal error, not your input: ` +
    `run again with SWAV_DEBUG=1 for the stack trace and report it)`;
};

/** The line a cause prints (its first failure, else its first defect). */
export const failureLine = (cause: Cause.Cause<unknown>): string => {
  const failure = Cause.findError(cause);
  if (failure._tag === "Success") return `error: ${describeFailure(failure.success, false)}`;
  const defect = Cause.findDefect(cause);
  if (defect._tag === "Success") return `error: ${describeFailure(defect.success, true)}`;
  return "error: interrupted";
};

/** Prints an error's message on one line (tag first) and sets exit code 1; never a stack trace. */
export const reportFailure = <A, E, R>(effect: Effect.Effect<A, E, R>): Effect.Effect<A | void, never, R> =>
  effect.pipe(
    Effect.catchCause((cause) =>
      // An interruption alone (Ctrl-C) is not a failure to report: the runtime handles it.
      Cause.hasInterruptsOnly(cause) ? Effect.failCause(cause as Cause.Cause<never>) : Effect.sync(() => {
        console.error(failureLine(cause));
        if (debugEnabled()) console.error(Cause.pretty(cause));
        Deno.exitCode = 1;
      })
    ),
  );
