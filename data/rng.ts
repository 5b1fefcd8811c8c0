/**
 * Seeded randomness keyed by (seed, epoch, sample index).
 *
 * Every sample draws from its own generator, derived by hashing the key, so the
 * crops of a sample depend only on the key and never on the order or the
 * concurrency in which samples are prepared. The generator is splitmix32-seeded
 * xoshiro128**: fast, 2^128 period, and its state is four 32-bit words.
 */

/** A uniform random source on [0, 1) with a few derived draws. */
export interface Rng {
  /** Uniform on [0, 1). */
  next(): number;
  /** Uniform on [low, high). */
  uniform(low: number, high: number): number;
  /** Integer uniform on [low, high] (inclusive, as Python's random.randint and torch.randint(low, high + 1)). */
  int(low: number, high: number): number;
  /** True with probability p. */
  bernoulli(p: number): boolean;
  /** Fisher-Yates permutation of 0..n-1. */
  permutation(n: number): Uint32Array;
  /** The four state words (for checkpoints). */
  state(): readonly [number, number, number, number];
}

const mix32 = (x: number): number => {
  // splitmix32 finaliser (Stafford variant 13 constants folded to 32 bits).
  x = Math.imul(x ^ (x >>> 16), 0x85ebca6b);
  x = Math.imul(x ^ (x >>> 13), 0xc2b2ae35);
  return (x ^ (x >>> 16)) >>> 0;
};

/** Hashes a key of integers to a 32-bit word (order-sensitive). */
const hashKey = (parts: readonly number[]): number => {
  let h = 0x9e3779b9;
  for (const part of parts) {
    // Fold both 32-bit halves so keys above 2^32 (large seeds, long runs) stay distinct.
    const low = part >>> 0;
    const high = Math.floor(part / 4294967296) >>> 0;
    h = mix32(h ^ low);
    h = mix32((h + 0x7f4a7c15) ^ high);
  }
  return h;
};

/** A generator from explicit state words (restoring a checkpoint). */
export const rngFromState = (words: readonly [number, number, number, number]): Rng => {
  let [a, b, c, d] = words.map((w) => w >>> 0) as [number, number, number, number];
  if ((a | b | c | d) === 0) a = 1; // xoshiro's one forbidden state
  const nextU32 = (): number => {
    const result = Math.imul(rotl(Math.imul(b, 5), 7), 9) >>> 0;
    const t = b << 9;
    c ^= a;
    d ^= b;
    b ^= c;
    a ^= d;
    c ^= t;
    d = rotl(d, 11);
    return result;
  };
  const next = (): number => nextU32() / 4294967296;
  return {
    next,
    uniform: (low, high) => low + (high - low) * next(),
    int: (low, high) => low + Math.floor(next() * (high - low + 1)),
    bernoulli: (p) => next() < p,
    permutation: (n) => {
      const out = new Uint32Array(n);
      for (let i = 0; i < n; i++) out[i] = i;
      for (let i = n - 1; i > 0; i--) {
        const j = Math.floor(next() * (i + 1));
        const tmp = out[i]!;
        out[i] = out[j]!;
        out[j] = tmp;
      }
      return out;
    },
    state: () => [a, b, c, d],
  };
};

const rotl = (x: number, k: number): number => ((x << k) | (x >>> (32 - k))) >>> 0;

/**
 * The generator for one key, for example `rngFor(seed, epoch, sampleIndex)` for
 * a sample's augmentations or `rngFor(seed, epoch)` for an epoch's shuffle.
 */
export const rngFor = (...key: readonly number[]): Rng => {
  const h = hashKey(key);
  return rngFromState([mix32(h ^ 0x1), mix32(h ^ 0x2), mix32(h ^ 0x3), mix32(h ^ 0x4)]);
};
