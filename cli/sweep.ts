/**
 * `deno task sweep --config FILE --grid KEY=V1|V2 ... [--out DIR] [--epochs N] [--probe-epochs N]`:
 * a grid of pretraining runs over config settings (pipelines/sweep.ts), a table of kNN and linear
 * top-1 per cell.
 */
import { Cause, Effect } from "effect";
import { TensorBackend } from "../backend/tensor_backend.ts";
import { sweepFromFile } from "../pipelines/sweep.ts";

export const sweepUsage =
  `deno task sweep --config FILE --grid KEY=V1|V2|... [--grid ...] [--out DIR] [--epochs N] [--probe-epochs N]

A grid of pretraining runs: every combination of the --grid values (dotted config keys, values as JSON
separated by |, e.g. --grid 'multicrop.nmbCrops=[2]|[2,4]' --grid 'train.method="swav"|"simclr"') merged
over the config file (--epochs over the file), one run folder per cell under --out (default runs/sweep),
named after the cell's values. Every cell's config is checked before any cell trains. Then kNN (the
config's train.knnK and knnTemperature) and the fast linear probe (--probe-epochs, default 20; 0 = none)
on each cell's backbone features; the source must be labelled. A stopped sweep resumes: finished cells
(cell.json) are read back, an unfinished one continues from its checkpoint. Writes sweep.json, sweep.md
and sweep.html (grouped bars) to --out.`;

/** The flags; a wrong one is a one-line error. */
export const parseSweepArgs = (args: readonly string[]) => {
  const known = new Set(["--config", "--grid", "--out", "--epochs", "--probe-epochs"]);
  const grid: string[] = [];
  const single = new Map<string, string>();
  for (let i = 0; i < args.length; i++) {
    const a = args[i]!;
    if (!known.has(a)) throw new Error(`unknown argument ${a} (known: ${[...known].join(" ")})`);
    const v = args[i + 1];
    if (v === undefined || v.startsWith("--")) throw new Error(`${a} needs a value`);
    i++;
    if (a === "--grid") grid.push(v);
    else single.set(a, v);
  }
  const int = (name: string, fallback: number | undefined, min: number) => {
    const v = single.get(name);
    if (v === undefined) return fallback;
    const n = Number(v);
    if (!Number.isInteger(n) || n < min) throw new Error(`${name} must be an integer >= ${min}, got '${v}'`);
    return n;
  };
  const config = single.get("--config");
  if (config === undefined) throw new Error("--config FILE is required (the base config of every cell)");
  if (grid.length === 0) {
    throw new Error(`--grid KEY=V1|V2 is required, e.g. --grid 'swav.epsilon=0.03|0.05'`);
  }
  return {
    config,
    grid,
    out: single.get("--out") ?? "runs/sweep",
    epochs: int("--epochs", undefined, 1),
    probeEpochs: int("--probe-epochs", 20, 0)!,
  };
};

if (import.meta.main) {
  if (Deno.args.includes("--help") || Deno.args.includes("-h")) {
    console.log(sweepUsage);
    Deno.exit(0);
  }
  let options;
  try {
    options = parseSweepArgs(Deno.args);
  } catch (error) {
    console.error(`sweep: ${(error as Error).message}`);
    Deno.exit(2);
  }
  const { epochs, ...rest } = options;
  const exit = await Effect.runPromiseExit(
    sweepFromFile({
      ...rest,
      ...(epochs === undefined ? {} : { epochs }),
      hooks: {
        onCell: (c) =>
          console.error(
            `${c.name}: kNN ${(100 * c.knnTop1).toFixed(2)}%` +
              (Number.isFinite(c.linearTop1) ? `, linear ${(100 * c.linearTop1).toFixed(2)}%` : "") +
              (c.reused ? " (finished earlier)" : ""),
          ),
        onEpoch: (r) =>
          console.error(`  epoch ${r.epoch}: mean loss ${r.meanLoss.toFixed(4)} (${r.seconds.toFixed(1)} s)`),
      },
    }).pipe(Effect.provide(TensorBackend.layer())),
  );
  if (exit._tag === "Failure") {
    const failure = Cause.squash(exit.cause);
    console.error(`sweep: ${failure instanceof Error ? failure.message : String(failure)}`);
    Deno.exit(1);
  }
  console.log(exit.value.table);
}
