/**
 * `deno task report RUN_DIR [--out FILE.html]`: the run report as one self-contained HTML file
 * (default RUN_DIR/report.html); prints where it is.
 */
import { NodeRuntime, NodeServices } from "@effect/platform-node";
import { Effect, Option } from "effect";
import { Argument, Command, Flag } from "effect/cli";
import { TensorBackend } from "../backend/tensor_backend.ts";
import { buildReport } from "../pipelines/report_html.ts";
import { reportFailure } from "./report.ts";

/** Builds RUN_DIR's report and writes it to `out` (default RUN_DIR/report.html); returns the path. */
export const writeReport = (folder: string, out?: string) =>
  Effect.gen(function* () {
    const html = yield* buildReport(folder, { generatedAt: new Date().toISOString() });
    const path = out ?? `${folder}/report.html`;
    yield* Effect.tryPromise({
      try: () => Deno.writeTextFile(path, html),
      catch: (error) => new Error(`cannot write ${path}: ${error instanceof Error ? error.message : error}`),
    });
    return path;
  });

export const reportCommand = Command.make("report", {
  runDir: Argument.String("RUN_DIR").pipe(Argument.withDescription("the run folder (train.out)")),
  out: Flag.String("out").pipe(
    Flag.withDescription("the HTML file to write (default RUN_DIR/report.html)"),
    Flag.optional,
  ),
}, (flags) =>
  reportFailure(Effect.gen(function* () {
    const path = yield* writeReport(flags.runDir, Option.getOrUndefined(flags.out)).pipe(
      Effect.provide(TensorBackend.layer()),
    );
    console.log(`report written to ${path}`);
  }))).pipe(
    Command.withDescription(
      "Write a run's report: curves, prototype usage, retrieval, feature map, evaluation",
    ),
  );

if (import.meta.main) {
  reportCommand.pipe(
    Command.run({ version: "0.1.0" }),
    Effect.provide(NodeServices.layer),
    NodeRuntime.runMain,
  );
}
