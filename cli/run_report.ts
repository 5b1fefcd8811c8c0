/**
 * `deno task report RUN_DIR [--out FILE.html]`: the run report as one self-contained HTML file
 * (default RUN_DIR/report.html); prints where it is.
 *
 * Where it writes is checked before anything is computed: RUN_DIR is a folder, the output ends in
 * `.html`, its folder exists (none is created), and a file already there is replaced only when it
 * is a report this command wrote (never a symlink, a folder or another file). The page is written
 * beside it and renamed over it, so an interrupted write leaves the old report whole.
 */
import { NodeRuntime, NodeServices } from "@effect/platform-node";
import { Effect, Option, Schema } from "effect";
import { Argument, Command, Flag } from "effect/cli";
import { TensorBackend } from "../backend/tensor_backend.ts";
import { buildReport, REPORT_MARK } from "../pipelines/report_html.ts";
import { reportFailure } from "./report.ts";

export class ReportOutputError extends Schema.TaggedError<ReportOutputError>()("ReportOutputError", {
  message: Schema.String,
}) {}

const fail = (message: string) => Effect.fail(new ReportOutputError({ message }));

const lstat = (path: string) => Effect.promise(() => Deno.lstat(path).catch(() => undefined));

/** The first bytes of a regular file (a report's mark is in its first line). */
const head = (path: string) =>
  Effect.promise(async () => {
    try {
      using file = await Deno.open(path, { read: true });
      const buffer = new Uint8Array(512);
      const n = await file.read(buffer);
      return new TextDecoder().decode(buffer.subarray(0, n ?? 0));
    } catch {
      return "";
    }
  });

/** Where the report of `folder` goes, once every rule above holds. */
export const reportTarget = (folder: string, out?: string) =>
  Effect.gen(function* () {
    const run = yield* Effect.promise(() => Deno.stat(folder).catch(() => undefined));
    if (run === undefined) return yield* fail(`RUN_DIR ${folder}: no such folder`);
    if (!run.isDirectory) {
      return yield* fail(`RUN_DIR ${folder}: not a folder (give a run folder, train.out)`);
    }
    const path = out ?? `${folder}/report.html`;
    if (!path.endsWith(".html")) {
      return yield* fail(`--out ${path}: the report is one HTML file: give a name ending in .html`);
    }
    const slash = path.lastIndexOf("/");
    const parent = slash < 0 ? "." : slash === 0 ? "/" : path.slice(0, slash);
    const where = yield* Effect.promise(() => Deno.stat(parent).catch(() => undefined));
    if (where?.isDirectory !== true) {
      return yield* fail(`--out ${path}: the folder ${parent} does not exist (create it first)`);
    }
    const existing = yield* lstat(path);
    if (existing !== undefined) {
      if (!existing.isFile) {
        return yield* fail(
          `--out ${path}: exists and is ${
            existing.isSymlink ? "a symlink" : existing.isDirectory ? "a folder" : "not a regular file"
          }: not replaced (choose another name)`,
        );
      }
      const first = yield* head(path);
      // Reports written before the mark existed start with the same title.
      if (
        !first.includes(REPORT_MARK) &&
        !/^<!DOCTYPE html>\n<html lang="en"><head>.*<title>SwAV run /s.test(first)
      ) {
        return yield* fail(
          `--out ${path}: exists and is not a report written by this command: not replaced (choose another name, or remove it)`,
        );
      }
    }
    return path;
  });

/** Builds RUN_DIR's report and writes it to `out` (default RUN_DIR/report.html); returns the path. */
export const writeReport = (folder: string, out?: string) =>
  Effect.gen(function* () {
    const path = yield* reportTarget(folder, out);
    const html = yield* buildReport(folder, { generatedAt: new Date().toISOString() });
    const slash = path.lastIndexOf("/");
    yield* Effect.tryPromise({
      try: async () => {
        const temporary = await Deno.makeTempFile({
          dir: slash < 0 ? "." : path.slice(0, slash) || "/",
          prefix: ".report-",
          suffix: ".html.partial",
        });
        try {
          await Deno.writeTextFile(temporary, html);
          await Deno.rename(temporary, path);
        } catch (error) {
          await Deno.remove(temporary).catch(() => {});
          throw error;
        }
      },
      catch: (error) =>
        new ReportOutputError({
          message: `cannot write ${path}: ${error instanceof Error ? error.message : String(error)}`,
        }),
    });
    return path;
  });

export const reportCommand = Command.make("report", {
  runDir: Argument.String("RUN_DIR").pipe(Argument.withDescription("the run folder (train.out)")),
  out: Flag.String("out").pipe(
    Flag.withDescription(
      "the HTML file to write (default RUN_DIR/report.html; its folder must exist; replaces only an earlier report)",
    ),
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
