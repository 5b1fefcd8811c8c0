/**
 * Progress for long jobs: one rewritten line on a terminal (epoch, step, loss,
 * lr, images/s, ETA), plain periodic lines otherwise (logs, CI).
 */
import type { EpochReport, PretrainHooks, StepMetrics } from "../pipelines/pretrain.ts";

const isTerminal = (): boolean => {
  try {
    return Deno.stderr.isTerminal();
  } catch {
    return false;
  }
};

const formatDuration = (seconds: number): string => {
  if (!Number.isFinite(seconds)) return "?";
  const s = Math.round(seconds);
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  return h > 0 ? `${h}h${String(m).padStart(2, "0")}m` : `${m}m${String(s % 60).padStart(2, "0")}s`;
};

/** Progress hooks writing to stderr (stdout stays free for `--json`). */
export const progressHooks = (options: { quiet?: boolean } = {}): PretrainHooks => {
  const tty = isTerminal();
  const encoder = new TextEncoder();
  const write = (text: string) => Deno.stderr.writeSync(encoder.encode(text));
  const started = performance.now();
  let stepsSeen = 0;
  let firstStep: number | undefined;
  let lastPlain = 0;
  const line = (m: StepMetrics, p: { stepInEpoch: number; stepsPerEpoch: number; totalSteps: number }) => {
    const elapsed = (performance.now() - started) / 1000;
    firstStep ??= m.step - 1;
    stepsSeen = m.step - firstStep;
    const eta = ((p.totalSteps - m.step) * elapsed) / Math.max(1, stepsSeen);
    return `epoch ${m.epoch} step ${p.stepInEpoch}/${p.stepsPerEpoch} (total ${m.step}/${p.totalSteps}) ` +
      `loss ${m.loss.toFixed(4)} lr ${m.lr.toExponential(2)} ${m.images_per_s.toFixed(1)} img/s ` +
      (m.prototypes_in_use === undefined ? "" : `protos ${m.prototypes_in_use} `) +
      (m.embedding_std === undefined ? "" : `emb std ${m.embedding_std.toFixed(3)} `) +
      `ETA ${formatDuration(eta)}`;
  };
  return {
    onStep: (m, p) => {
      if (options.quiet) return;
      if (tty) {
        write(`\r\x1b[2K${line(m, p)}`);
      } else if (performance.now() - lastPlain > 10_000 || m.step === p.totalSteps) {
        lastPlain = performance.now();
        write(`${line(m, p)}\n`);
      }
    },
    onEpoch: (r: EpochReport) => {
      if (options.quiet) return;
      const knn = (r.knnTop1 === undefined ? "" : ` kNN top-1 ${(100 * r.knnTop1).toFixed(2)}%`) +
        (r.onlineProbeTop1 === undefined
          ? ""
          : ` online probe top-1 ${(100 * r.onlineProbeTop1).toFixed(2)}%`);
      write(
        `${tty ? "\r\x1b[2K" : ""}epoch ${r.epoch}: mean loss ${r.meanLoss.toFixed(4)}${knn} (${
          r.seconds.toFixed(1)
        } s)\n`,
      );
    },
    onWarning: (message) => write(`${tty ? "\r\x1b[2K" : ""}warning: ${message}\n`),
    onInfo: (message) => {
      if (!options.quiet) write(`${tty ? "\r\x1b[2K" : ""}${message}\n`);
    },
  };
};
