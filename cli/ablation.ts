/**
 * `deno task ablation --data SOURCE [--epochs N] [--seeds N] [--out DIR] [--probe-epochs N]`: the paper's
 * multi-crop ablation (pipelines/ablation.ts), a table of kNN and linear top-1 per method and crops.
 */
import { Cause, Effect } from "effect";
import { TensorBackend } from "../backend/tensor_backend.ts";
import { type AblationRow, runAblation } from "../pipelines/ablation.ts";
import { ablationMarkdown } from "../pipelines/ablation.ts";

export const ablationUsage =
  `deno task ablation --data SOURCE [--epochs N] [--seeds N] [--out DIR] [--probe-epochs N]

The SwAV paper's ablation on your labelled data: {swav, deepclusterv2, simclr} x {2 crops at the images'
side; 2 + 4 crops, the small ones at half the side}: six runs per seed, each in its own folder under --out.

Budget (the same for every cell): the small-data recipe (ResNet-18 width 32, 3x3 stem, head 512/128,
batch 128 (256 with 2 + 4 crops would not fit the 4 GiB wasm heap), LARC trust 0.02, lr 0.6 -> 0.0006 per 256 images, prototypes 10x the classes; DeepCluster-v2
three heads of that size) for --epochs (default 2), seed 31 + s for seed s < --seeds (default 1). Then kNN
(k 200, T 0.1) and the fast linear probe (--probe-epochs, default 20) on each cell's backbone features.
A stopped grid resumes: finished cells (cell.json) are read back, an unfinished one continues from its
checkpoint. Writes ablation.json and ablation.md to --out (default runs/ablation).`;

/** The flags; a wrong one is a one-line error. */
export const parseAblationArgs = (args: readonly string[]) => {
  const known = new Set(["--data", "--epochs", "--seeds", "--out", "--probe-epochs"]);
  const value = (name: string) => {
    const i = args.indexOf(name);
    if (i < 0) return undefined;
    const v = args[i + 1];
    if (v === undefined || v.startsWith("--")) throw new Error(`${name} needs a value`);
    return v;
  };
  for (const a of args) {
    if (a.startsWith("--") && !known.has(a)) {
      throw new Error(`unknown flag ${a} (known: ${[...known].join(" ")})`);
    }
  }
  const int = (name: string, fallback: number) => {
    const v = value(name);
    if (v === undefined) return fallback;
    const n = Number(v);
    if (!Number.isInteger(n) || n < 1) throw new Error(`${name} must be an integer >= 1, got '${v}'`);
    return n;
  };
  const data = value("--data");
  if (data === undefined) {
    throw new Error("--data SOURCE is required (a labelled source, e.g. an IDX folder)");
  }
  return {
    data,
    epochs: int("--epochs", 2),
    seeds: int("--seeds", 1),
    out: value("--out") ?? "runs/ablation",
    probeEpochs: int("--probe-epochs", 20),
  };
};

const printTable = (table: readonly AblationRow[]) => console.log(ablationMarkdown(table));

if (import.meta.main) {
  if (Deno.args.includes("--help") || Deno.args.includes("-h")) {
    console.log(ablationUsage);
    Deno.exit(0);
  }
  let options;
  try {
    options = parseAblationArgs(Deno.args);
  } catch (error) {
    console.error(`ablation: ${(error as Error).message}`);
    Deno.exit(2);
  }
  const exit = await Effect.runPromiseExit(
    runAblation({
      ...options,
      hooks: {
        onCell: (c) =>
          console.error(
            `${c.method} ${c.crops} crops seed ${c.seed}: kNN ${(100 * c.knnTop1).toFixed(2)}%, linear ` +
              `${(100 * c.linearTop1).toFixed(2)}%${c.reused ? " (finished earlier)" : ""}`,
          ),
        onEpoch: (r) =>
          console.error(`  epoch ${r.epoch}: mean loss ${r.meanLoss.toFixed(4)} (${r.seconds.toFixed(1)} s)`),
      },
    }).pipe(Effect.provide(TensorBackend.layer())),
  );
  if (exit._tag === "Failure") {
    const failure = Cause.squash(exit.cause);
    console.error(`ablation: ${failure instanceof Error ? failure.message : String(failure)}`);
    Deno.exit(1);
  }
  printTable(exit.value.table);
}
