/**
 * The trainer dies with its wrapper. `npx deno task ...` starts Deno through
 * npm's Node wrapper (`node_modules/.bin/deno`) and Deno's task runner; a
 * kill -9 of the wrapper reaches neither child, so the trainer would go on as
 * an orphan, still writing checkpoints into a folder its user thinks is free.
 *
 * At start we record the chain of ancestor processes that are part of the
 * launch (Deno's task runner and the Node wrapper, up to the first other
 * process, usually the shell). While the command runs, a timer checks once a
 * second that the chain is unchanged; when an ancestor is gone, the process
 * stops as on Ctrl-C (SIGINT: scopes release their resources, the run folder's
 * lock is dropped, no checkpoint is half-written). Linux only (/proc); a no-op
 * elsewhere, and when Deno was started directly.
 */

const LAUNCHERS = new Set(["deno", "node"]);
const HARD_EXIT_AFTER_MS = 30_000;

interface ProcessInfo {
  readonly pid: number;
  readonly ppid: number;
  readonly name: string;
}

/** `/proc/<pid>/stat`: "pid (comm) state ppid ..." (comm may hold spaces and parentheses). */
export const parseStat = (text: string): ProcessInfo | undefined => {
  const open = text.indexOf("(");
  const close = text.lastIndexOf(")");
  if (open < 0 || close < open) return undefined;
  const pid = Number(text.slice(0, open).trim());
  const fields = text.slice(close + 2).split(" ");
  const ppid = Number(fields[1]);
  if (!Number.isInteger(pid) || !Number.isInteger(ppid)) return undefined;
  return { pid, ppid, name: text.slice(open + 1, close) };
};

const readProcess = (pid: number): ProcessInfo | undefined => {
  try {
    return parseStat(Deno.readTextFileSync(`/proc/${pid}/stat`));
  } catch {
    return undefined;
  }
};

/** Our ancestors that belong to the launch (Deno and Node processes), nearest first. */
export const launcherChain = (pid: number = Deno.pid): number[] => {
  const chain: number[] = [];
  let current = readProcess(pid);
  while (current !== undefined && current.ppid > 1 && chain.length < 8) {
    const parent = readProcess(current.ppid);
    if (parent === undefined || !LAUNCHERS.has(parent.name)) break;
    chain.push(parent.pid);
    current = parent;
  }
  return chain;
};

/** True while every process of `chain` still exists and is still the parent it was. */
export const chainIntact = (chain: readonly number[], pid: number = Deno.pid): boolean => {
  let child = pid;
  for (const ancestor of chain) {
    const info = readProcess(child);
    if (info === undefined || info.ppid !== ancestor) return false;
    child = ancestor;
  }
  return true;
};

/**
 * Starts the watch (once per process). `onOrphaned` defaults to stopping as on
 * Ctrl-C; the timer does not keep the process alive.
 */
export const exitWithWrapper = (
  onOrphaned: () => void = () => Deno.kill(Deno.pid, "SIGINT"),
  intervalMs = 1000,
): void => {
  if (Deno.build.os !== "linux") return;
  const chain = launcherChain();
  if (chain.length === 0) return;
  const timer = setInterval(() => {
    if (!chainIntact(chain)) {
      clearInterval(timer);
      onOrphaned();
      // Should the graceful stop hang, leave anyway: an orphan must not keep running.
      Deno.unrefTimer(setTimeout(() => Deno.exit(130), HARD_EXIT_AFTER_MS));
    }
  }, intervalMs);
  Deno.unrefTimer(timer);
};
