/** Counts in words for what the CLI and the reports print. */

/** "1 epoch", "2 epochs"; `nouns` for an irregular plural. */
export const plural = (count: number, noun: string, nouns = `${noun}s`): string =>
  `${count} ${count === 1 ? noun : nouns}`;
