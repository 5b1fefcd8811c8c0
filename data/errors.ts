/** The text of a caught value: an `Error`'s message, anything else as a string. */
export const reasonOf = (cause: unknown): string => cause instanceof Error ? cause.message : String(cause);
