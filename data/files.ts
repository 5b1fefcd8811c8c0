/**
 * Reading a data file without hanging or over-reading: the path is stat'ed
 * first (symlinks followed; a loop fails with ELOOP), anything but a regular
 * file is refused by type (a FIFO would block `open` forever, a device such as
 * /dev/zero never ends), the size is checked against a cap before reading, and
 * the opened file is checked again (it may have been swapped meanwhile).
 */
import { reasonOf } from "./errors.ts";

/** Largest image file read, in bytes: no image under the pixel cap needs more. */
export const MAX_IMAGE_FILE_BYTES = 1 << 30;

const kindOf = (info: Deno.FileInfo): string =>
  info.isDirectory
    ? "a directory"
    : info.isFifo
    ? "a FIFO"
    : info.isSocket
    ? "a socket"
    : info.isCharDevice
    ? "a character device"
    : info.isBlockDevice
    ? "a block device"
    : "not a regular file";

/** Why `info` is not a readable data file of at most `maxBytes`, or undefined. */
const refusal = (info: Deno.FileInfo, maxBytes: number): string | undefined =>
  !info.isFile
    ? `not a regular file (${kindOf(info)})`
    : info.size > maxBytes
    ? `file of ${info.size} bytes, over the cap of ${maxBytes}`
    : undefined;

/** The bytes of the regular file at `path`, or why it cannot be read (never blocks on a FIFO). */
export const readRegularFile = async (path: string, maxBytes: number): Promise<Uint8Array | string> => {
  let info: Deno.FileInfo;
  try {
    info = await Deno.stat(path);
  } catch (cause) {
    return reasonOf(cause);
  }
  const refused = refusal(info, maxBytes);
  if (refused !== undefined) return refused;
  let file: Deno.FsFile;
  try {
    file = await Deno.open(path, { read: true });
  } catch (cause) {
    return reasonOf(cause);
  }
  try {
    const opened = refusal(await file.stat(), maxBytes);
    if (opened !== undefined) return opened;
    const out = new Uint8Array(info.size);
    let at = 0;
    while (at < out.length) {
      const n = await file.read(out.subarray(at));
      if (n === null) break;
      at += n;
    }
    // A file that shrank meanwhile is returned short; one that grew is read to its stat'ed size.
    return at === out.length ? out : out.subarray(0, at);
  } catch (cause) {
    return reasonOf(cause);
  } finally {
    file.close();
  }
};
