/**
 * A stage is a value: a name, a validated config, and an Effect-returning step
 * from a typed input to a typed output. Pipelines are built by composing stages,
 * so the dataflow of a pipeline file reads top to bottom.
 */
import { Effect, Schema, type Scope } from "effect";
import { scoped } from "../backend/resources.ts";

/**
 * One step of a pipeline as a value: a name, a Schema for its config, and the
 * Effect-returning work from `In` to `Out`. Validate a raw config with
 * `configure` and compose configured steps with `andThen`.
 */
export interface Stage<In, Out, Config, E = never, R = never> {
  /** The stage's name, used in error messages (`ConfigError.stage`). */
  readonly name: string;
  /** Schema that validates (and fills defaults of) this stage's config. */
  readonly config: Schema.Decoder<Config>;
  /** The work of the stage for one input, given an already validated config. */
  readonly run: (config: Config) => (input: In) => Effect.Effect<Out, E, R>;
}

/** Declares a stage; the identity function, there for inference and docs. */
export const defineStage = <In, Out, Config, E = never, R = never>(
  stage: Stage<In, Out, Config, E, R>,
): Stage<In, Out, Config, E, R> => stage;

/** A config that failed validation; `message` names the field and the allowed values. */
export class ConfigError extends Schema.TaggedError<ConfigError>()("ConfigError", {
  stage: Schema.String,
  message: Schema.String,
}) {}

/**
 * Validates raw config (for example parsed JSON) for `stage`, naming the bad field on failure.
 *
 * @example A stage of one's own, configured twice and composed
 * ```ts
 * import { Effect, Schema } from "effect";
 * import assert from "node:assert/strict";
 * import { andThen, configure, defineStage } from "@swav/swav-ts";
 *
 * const scale = defineStage({
 *   name: "scale",
 *   config: Schema.Struct({ factor: Schema.Number }),
 *   run: (config: { readonly factor: number }) => (input: number) => Effect.succeed(input * config.factor),
 * });
 * const sixTimes = await Effect.runPromise(Effect.gen(function* () {
 *   const double = yield* configure(scale, { factor: 2 });
 *   const triple = yield* configure(scale, { factor: 3 });
 *   return andThen(double, triple);
 * }));
 * assert.equal(await Effect.runPromise(sixTimes(7)), 42);
 * // A bad config fails with a ConfigError naming the stage and the field.
 * const error = await Effect.runPromise(Effect.flip(configure(scale, { factor: "two" })));
 * assert.equal(error.stage, "scale");
 * assert.match(error.message, /factor/);
 * ```
 */
export const configure = <In, Out, Config, E, R>(
  stage: Stage<In, Out, Config, E, R>,
  raw: unknown,
): Effect.Effect<(input: In) => Effect.Effect<Out, E, R>, ConfigError> =>
  Schema.decodeUnknownEffect(stage.config)(raw).pipe(
    Effect.mapError((error) => new ConfigError({ stage: stage.name, message: String(error.message) })),
    Effect.map((config) => stage.run(config)),
  );

/** Sequential composition of two configured steps: the output of `first` feeds `second`. */
export const andThen = <A, B, C, E1, R1, E2, R2>(
  first: (input: A) => Effect.Effect<B, E1, R1>,
  second: (input: B) => Effect.Effect<C, E2, R2>,
): (input: A) => Effect.Effect<C, E1 | E2, R1 | R2> =>
(input: A): Effect.Effect<C, E1 | E2, R1 | R2> => Effect.flatMap(first(input), second);

/**
 * A stage whose work is synchronous tensor maths: besides the Effect `run`, it
 * offers the same work as a plain function (`apply`), the form that can sit
 * inside a gradient tape (`tf.variableGrads` takes a synchronous closure).
 * `apply`'s result is owned by the caller (or by the tape's scope).
 */
export interface TensorStage<In, Out, Config, E = never, R = never> extends Stage<In, Out, Config, E, R> {
  /** The same work as `run`, synchronous: the caller owns (and disposes) the output's tensors. */
  readonly apply: (config: Config) => (input: In) => Out;
}

/** Declares a tensor stage; the identity function, there for inference and docs. */
export const defineTensorStage = <In, Out, Config, E = never, R = never>(
  stage: TensorStage<In, Out, Config, E, R>,
): TensorStage<In, Out, Config, E, R> => stage;

/**
 * A tensor stage from its synchronous work alone: `run` applies it and ties
 * the output's tensors to the caller's scope.
 */
export const tensorStage = <In, Out, Config>(stage: {
  readonly name: string;
  readonly config: Schema.Decoder<Config>;
  readonly apply: (config: Config) => (input: In) => Out;
}): TensorStage<In, Out, Config, never, Scope.Scope> => ({
  ...stage,
  run: (config) => {
    const apply = stage.apply(config);
    return (input) => scoped(() => apply(input));
  },
});
