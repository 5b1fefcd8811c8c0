/**
 * The decode stage: encoded image bytes (PNG or JPEG) to an RGB image, HWC,
 * uint8, through the image codec (`data/image_codec.ts`), with a policy for
 * inputs that cannot be decoded.
 */
import { Effect, Option, Schema } from "effect";
import { type DecodeError, decodeImage, type JpegDecoder, type RgbImage } from "../data/image_codec.ts";
import { defineStage, type Stage } from "./stage.ts";

/** What to do with an input that cannot be decoded: drop it (counted by the loader) or stop the run. */
export const DecodeErrorPolicy: Schema.Literals<readonly ["skip", "fail"]> = Schema.Literals([
  "skip",
  "fail",
]);
/** "skip" or "fail". */
export type DecodeErrorPolicy = typeof DecodeErrorPolicy.Type;

/** A validated decode config. */
export interface DecodeConfig {
  /** What a bad input does (default "skip"). */
  readonly onError: DecodeErrorPolicy;
  /** The JPEG decoder (default "auto": libjpeg-turbo when it loads). */
  readonly jpeg: JpegDecoder;
}

/** The decode stage's config schema: the error policy (default "skip") and the JPEG decoder (default "auto"). */
export const DecodeConfig: Schema.Codec<DecodeConfig, Partial<DecodeConfig>> = Schema.Struct({
  onError: DecodeErrorPolicy.pipe(Schema.withDecodingDefaultKey(Effect.succeed("skip" as const))),
  jpeg: Schema.Literals(["auto", "turbojpeg", "imagescript"]).pipe(
    Schema.withDecodingDefaultKey(Effect.succeed("auto" as const)),
  ),
});

/** One encoded image: its bytes and the path that names it in errors. */
export interface EncodedImage {
  /** Names the image in errors and skip reports. */
  readonly path: string;
  /** The PNG or JPEG file's bytes. */
  readonly bytes: Uint8Array;
}

/**
 * The decode stage. With `onError: "skip"` a bad input gives `Option.none()` and a
 * warning in the log (the loader counts and reports skips); with `"fail"` it fails
 * with the `DecodeError`.
 *
 * @example A PNG decodes; bytes that are no image are skipped under the default policy
 * ```ts
 * import { Effect, Option } from "effect";
 * import { encode } from "fast-png";
 * import assert from "node:assert/strict";
 * import { configure, decodeStage } from "@swav/swav-ts";
 *
 * const png = encode({ width: 2, height: 1, data: new Uint8Array([255, 0, 0, 0, 0, 255]), channels: 3 });
 * const [good, bad] = await Effect.runPromise(Effect.gen(function* () {
 *   const decode = yield* configure(decodeStage, {}); // onError: "skip", jpeg: "auto"
 *   return [
 *     yield* decode({ path: "red-blue.png", bytes: png }),
 *     yield* decode({ path: "notes.txt", bytes: new TextEncoder().encode("not an image") }),
 *   ];
 * }));
 * assert.deepEqual(Option.getOrThrow(good).data, new Uint8Array([255, 0, 0, 0, 0, 255]));
 * assert.ok(Option.isNone(bad)); // logged as a warning, counted by the loader
 * ```
 */
export const decodeStage: Stage<EncodedImage, Option.Option<RgbImage>, DecodeConfig, DecodeError> =
  defineStage({
    name: "decode",
    config: DecodeConfig,
    run:
      (config: DecodeConfig) => (input: EncodedImage): Effect.Effect<Option.Option<RgbImage>, DecodeError> =>
        decodeImage(input.bytes, input.path, { jpeg: config.jpeg }).pipe(
          Effect.map(Option.some),
          Effect.catchTag(
            "DecodeError",
            (error) =>
              config.onError === "fail"
                ? Effect.fail(error)
                : Effect.logWarning(`skipped ${error.path}: ${error.reason}`).pipe(Effect.as(Option.none())),
          ),
        ),
  });
