/**
 * Writing an output file the user named (an export) without harming what is
 * there: the bytes go to a new temp file beside the target (created
 * exclusively, so an existing file or symlink of that name is never opened),
 * then a rename replaces the target. A crash leaves the old file whole; a
 * symlink at the target is replaced, never written through.
 *
 * And never onto the input: `sameFile` resolves both paths (symlinks, `..`)
 * so that `export --out` naming the checkpoint it reads is refused.
 */

/** `bytes` into `path` atomically (temp file in the same folder, then rename). */
export const writeFileAtomic = async (path: string, bytes: Uint8Array): Promise<void> => {
  const temp = `${path}.${Deno.pid}-${crypto.randomUUID().slice(0, 8)}.tmp`;
  try {
    await Deno.writeFile(temp, bytes, { createNew: true });
    await Deno.rename(temp, path);
  } catch (error) {
    await Deno.remove(temp).catch(() => {});
    throw error;
  }
};

/** The real path of `path`, or of its folder joined with its name where it does not exist yet. */
export const realPathOf = async (path: string): Promise<string> => {
  try {
    return await Deno.realPath(path);
  } catch {
    const slash = path.lastIndexOf("/");
    const folder = slash < 0 ? "." : slash === 0 ? "/" : path.slice(0, slash);
    const name = path.slice(slash + 1);
    if (name === "" || name === "." || name === ".." || folder === path) return path;
    return `${(await realPathOf(folder)).replace(/\/$/, "")}/${name}`;
  }
};

/** Whether `a` and `b` name the same file or folder once symlinks and `..` are resolved. */
export const sameFile = async (a: string, b: string): Promise<boolean> =>
  (await realPathOf(a)) === (await realPathOf(b));
