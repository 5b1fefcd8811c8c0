/**
 * `deno doc --lint` on the library's entry point, as a gate: fails on every
 * documentation problem of ours (an export without JSDoc, without an explicit
 * type or return type, a public type that points at one of our own unexported
 * types) and prints each in full.
 *
 * One kind is counted, not failed: a public type that references a type of a
 * dependency (Effect's `Effect`, `Stream`, `Scope`, `Schema.TaggedError` that
 * every error class extends, ...). deno doc calls those "private" because the
 * dependency is not re-exported; re-exporting them would make deno doc lint
 * the dependency's own declarations instead (hundreds of errors in Effect's
 * .d.ts files, none of them ours to fix). A referenced type counts as ours when
 * a tracked .ts file of the repository declares it.
 *
 *   deno run --allow-run --allow-read docs/doc_lint.ts [entry ...]   (default: mod.ts)
 */

const entries = Deno.args.length > 0 ? Deno.args : ["mod.ts"];

interface Diagnostic {
  readonly kind: string;
  readonly message: string;
  readonly text: string;
}

/** Splits deno doc's text output into its `error[...]` blocks. */
const diagnosticsOf = (output: string): Diagnostic[] => {
  const blocks: Diagnostic[] = [];
  let current: { kind: string; message: string; lines: string[] } | undefined;
  for (const line of output.split("\n")) {
    const head = /^error\[([a-z-]+)\]: (.*)$/.exec(line);
    if (head !== null) {
      if (current !== undefined) blocks.push({ ...current, text: current.lines.join("\n").trimEnd() });
      current = { kind: head[1]!, message: head[2]!, lines: [line] };
    } else if (/^error: Found \d+ documentation lint error/.test(line)) {
      break;
    } else if (current !== undefined) {
      current.lines.push(line);
    }
  }
  if (current !== undefined) blocks.push({ ...current, text: current.lines.join("\n").trimEnd() });
  return blocks;
};

/** The source text of every tracked TypeScript file, for the "is this type ours" question. */
const ownSources = async (): Promise<string> => {
  const listed = await new Deno.Command("git", { args: ["ls-files", "*.ts"], stdout: "piped" }).output();
  const paths = new TextDecoder().decode(listed.stdout).split("\n").filter((p) => p !== "");
  const texts = await Promise.all(paths.map((p) => Deno.readTextFile(p).catch(() => "")));
  return texts.join("\n");
};

const escape = (name: string): string => name.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");

/** Whether `sources` declares `name` (an interface, type alias, class, enum, namespace, function or variable). */
const declares = (sources: string, name: string): boolean =>
  new RegExp(
    `^\\s*(?:export\\s+)?(?:declare\\s+)?(?:abstract\\s+)?(?:` +
      `(?:interface|class|enum|namespace)\\s+${escape(name)}\\b|` +
      `type\\s+${escape(name)}\\s*[=<]|` +
      `function\\s*\\*?\\s*${escape(name)}\\s*[(<]|` +
      `(?:const|let|var)\\s+${escape(name)}\\s*[=:])`,
    "m",
  ).test(sources);

const run = await new Deno.Command(Deno.execPath(), {
  args: ["doc", "--lint", ...entries],
  env: { NO_COLOR: "1" },
  stdout: "piped",
  stderr: "piped",
}).output();
const output = new TextDecoder().decode(run.stdout) + new TextDecoder().decode(run.stderr);
const diagnostics = diagnosticsOf(output);
if (!run.success && diagnostics.length === 0) {
  console.error(output);
  console.error(`doc lint: deno doc failed without diagnostics (exit ${run.code})`);
  Deno.exit(1);
}

const sources = await ownSources();
const dependencyRefs = new Map<string, number>();
const ours = diagnostics.filter((d) => {
  if (d.kind !== "private-type-ref") return true;
  const referenced = /references private type '([^']+)'/.exec(d.message)?.[1];
  if (referenced === undefined || declares(sources, referenced)) return true;
  dependencyRefs.set(referenced, (dependencyRefs.get(referenced) ?? 0) + 1);
  return false;
});

for (const d of ours) console.error(`${d.text}\n`);
const counted = [...dependencyRefs].sort((a, b) => b[1] - a[1]).map(([name, n]) => `${name} ${n}`).join(", ");
const tolerated = diagnostics.length - ours.length;
console.log(
  `doc lint ${
    entries.join(" ")
  }: ${ours.length} error(s) of ours; ${tolerated} reference(s) to dependency types` +
    (tolerated > 0 ? ` (${counted})` : ""),
);
if (ours.length > 0) Deno.exit(1);
