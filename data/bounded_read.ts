/**
 * Reading files named by untrusted input (a manifest, a command line) without
 * surprises: only regular files are read (never a FIFO, a device such as
 * /dev/zero, or a folder), every size is checked against a stated cap before
 * anything is allocated, and a path a manifest gives is resolved inside its
 * folder (no absolute paths, no `..`, no symlink that points out of it).
 */
import { Effect, Schema } from "effect";
import { readRegularFile as readBytes } from "./files.ts";

/** A file that cannot be read safely; `reason` says why, in words for the user. */
export class UnsafeFile extends Schema.TaggedError<UnsafeFile>()("UnsafeFile", {
  path: Schema.String,
  reason: Schema.String,
}) {
  override get message(): string {
    return `${this.path}: ${this.reason}`;
  }
}

const describe = (error: unknown): string =>
  error instanceof Deno.errors.NotFound
    ? "no such file"
    : error instanceof Deno.errors.PermissionDenied
    ? "permission denied"
    : error instanceof Error
    ? error.message
    : String(error);

const mib = (bytes: number) => `${(bytes / 2 ** 20).toFixed(bytes < 2 ** 20 ? 3 : 0)} MiB`;

/** The size of a regular file at `path` (symlinks followed), failing for anything else or past `cap` bytes. */
export const regularFileSize = (path: string, cap: number): Effect.Effect<number, UnsafeFile> =>
  Effect.gen(function* () {
    const info = yield* Effect.tryPromise({
      try: () => Deno.stat(path),
      catch: (error) => new UnsafeFile({ path, reason: describe(error) }),
    });
    if (!info.isFile) {
      return yield* new UnsafeFile({
        path,
        reason: `not a regular file (${info.isDirectory ? "a folder" : "a device, FIFO or socket"})`,
      });
    }
    if (info.size > cap) {
      return yield* new UnsafeFile({
        path,
        reason: `${mib(info.size)} is over the ${mib(cap)} this reader accepts`,
      });
    }
    return info.size;
  });

/**
 * Reads a regular file of at most `cap` bytes (data/files.ts's reader: stat before open, so a
 * FIFO is never opened, the size is checked before the buffer is allocated, and the opened
 * handle is checked again).
 */
export const readRegularFile = (path: string, cap: number): Effect.Effect<Uint8Array, UnsafeFile> =>
  Effect.gen(function* () {
    yield* regularFileSize(path, cap);
    const result = yield* Effect.promise(() => readBytes(path, cap));
    return typeof result === "string" ? yield* new UnsafeFile({ path, reason: result }) : result;
  });

/** The same as UTF-8 text (invalid bytes become U+FFFD; callers show it through `shown`). */
export const readRegularText = (path: string, cap: number): Effect.Effect<string, UnsafeFile> =>
  Effect.map(readRegularFile(path, cap), (bytes) => new TextDecoder().decode(bytes));

/** Whether `path` is a regular file, known without opening it (false for a FIFO, device, folder, missing file). */
export const isRegularFile = (path: string): Effect.Effect<boolean> =>
  Effect.promise(() => Deno.stat(path).then((info) => info.isFile, () => false));

/**
 * The real path of `relative` inside `folder`: a relative path of plain
 * segments (no `..`, no absolute path, no empty or `.` segment tricks) whose
 * real location, symlinks resolved, is still inside the folder's real location.
 */
export const resolveInside = (folder: string, relative: string): Effect.Effect<string, UnsafeFile> =>
  Effect.gen(function* () {
    const shown = `${folder}/${relative}`;
    const segments = relative.split(/[/\\]/);
    if (
      relative.length === 0 || relative.startsWith("/") || /^[A-Za-z]:/.test(relative) ||
      segments.some((s) => s === ".." || s === "") || relative.includes("\0")
    ) {
      return yield* new UnsafeFile({
        path: shown,
        reason: `the path "${relative}" leaves its folder (only plain relative names are allowed)`,
      });
    }
    const realFolder = yield* Effect.tryPromise({
      try: () => Deno.realPath(folder),
      catch: (error) => new UnsafeFile({ path: folder, reason: describe(error) }),
    });
    const real = yield* Effect.tryPromise({
      try: () => Deno.realPath(`${realFolder}/${relative}`),
      catch: (error) => new UnsafeFile({ path: shown, reason: describe(error) }),
    });
    if (!real.startsWith(realFolder.endsWith("/") ? realFolder : `${realFolder}/`)) {
      return yield* new UnsafeFile({ path: shown, reason: `a symlink to ${real}, outside the folder` });
    }
    return real;
  });
