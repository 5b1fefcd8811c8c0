/** The text of a caught value: an `Error`'s message, anything else as a string. */
export const reasonOf = (cause: unknown): string => cause instanceof Error ? cause.message : String(cause);

/**
 * `text` as it may appear inside a one-line message: control characters, invalid UTF-8 (U+FFFD)
 * and other unprintable characters escaped as `\xNN` / `\u{...}`, and cut to `max` characters with
 * an ellipsis. Only the first `max` characters are looked at, so a huge input costs no more than a
 * short one.
 */
export const shown = (text: string, max = 120): string => {
  const head = text.length > max ? text.slice(0, max) : text;
  const escaped = head.replace(
    /[\p{Cc}\p{Cs}\u2028\u2029\ufffd]/gu,
    (c) => {
      const code = c.charCodeAt(0);
      return code < 0x100 ? `\\x${code.toString(16).padStart(2, "0")}` : `\\u{${code.toString(16)}}`;
    },
  );
  return text.length > max ? `${escaped}…` : escaped;
};
