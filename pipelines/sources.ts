/**
 * Source names that are not folders: `builtin:demo` is the generated demo data
 * set (coloured shapes and textures, 10 classes, PNG files), written on first
 * use to `$SWAV_DATA_DIR/demo` (default `runs/data/demo`).
 */
import { Effect } from "effect";
import { writeDemoDataset } from "../data/demo_dataset.ts";
import { SourceError } from "../data/sources.ts";

/** Options of the built-in demo data set. */
export const demoDatasetOptions = {
  perClassTrain: 200,
  perClassTest: 50,
  size: 32,
  seed: 2020,
} as const;

export const demoFolder = (): string => `${Deno.env.get("SWAV_DATA_DIR") ?? "runs/data"}/demo`;

/** Turns a SOURCE that names a built-in data set into a folder SOURCE (creating it if needed). */
export const resolveSourceSpec = (spec: string): Effect.Effect<string, SourceError> => {
  const match = /^builtin:([a-z]+)(:(train|test|val))?$/.exec(spec);
  if (match === null) return Effect.succeed(spec);
  if (match[1] !== "demo") {
    return Effect.fail(
      new SourceError({ path: spec, reason: "unknown built-in data set (known: builtin:demo)" }),
    );
  }
  const folder = demoFolder();
  return Effect.tryPromise({
    try: () => writeDemoDataset({ folder, ...demoDatasetOptions }),
    catch: (error) =>
      new SourceError({ path: folder, reason: `cannot write the demo data set: ${String(error)}` }),
  }).pipe(Effect.as(`${folder}${match[2] ?? ""}`));
};
