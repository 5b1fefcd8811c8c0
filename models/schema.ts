/**
 * Schema building blocks shared by every config section (model, stages, run):
 * a field with a default, and the numeric ranges settings use. One place, so
 * the same bound reads the same everywhere.
 */
import { Effect, Schema } from "effect";

/** `schema`, filled with `value` where the key is missing. */
export const withDefault = <S extends Schema.Top & { readonly Encoded: unknown }>(
  schema: S,
  value: S["Encoded"],
) => schema.pipe(Schema.withDecodingDefaultKey(Effect.succeed(value)));

export const PositiveInt = Schema.Int.check(Schema.isGreaterThanOrEqualTo(1));
export const NonNegativeInt = Schema.Int.check(Schema.isGreaterThanOrEqualTo(0));
export const Positive = Schema.Finite.check(Schema.isGreaterThan(0));
export const NonNegative = Schema.Finite.check(Schema.isGreaterThanOrEqualTo(0));
export const Probability = Schema.Finite.check(Schema.isBetween({ minimum: 0, maximum: 1 }));
