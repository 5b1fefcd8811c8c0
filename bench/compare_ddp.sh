#!/usr/bin/env bash
# Data-parallel comparison on one machine, sides alternated for --rounds rounds (medians compared):
#
#   ours_2x1       npx deno task bench --stage step --procs 2 --threads 1 --sync-bn false   (MPI, 2 ranks)
#   ours_2x1_sync  the same with --sync-bn true (the cost of synchronised batch norm)
#   ours_1x2       npx deno task bench --stage step --threads 2                             (1 process)
#   torch_ddp      bench/torch_ddp_step.py: PyTorch DDP, gloo, 2 processes x 1 thread, plain batch norm
#                  (PyTorch 1.13's SyncBatchNorm runs on CUDA only), the reference's distributed_sinkhorn
#
#   bench/compare_ddp.sh [--rounds 3] [--width 16] [--batch 64] [--crops 2x32] [--prototypes 3000] ...
#
# --batch is the global batch on every side. Every other argument goes to every side. Prints each side's
# step ms per round, the medians, images/s, throughput ratios against PyTorch DDP and the 2-rank scaling
# efficiency (1-process 2-thread time / 2-rank time), and each side's peak RSS per process
# (/usr/bin/time -v: the largest process of the side). TORCH_DDP overrides PyTorch's command.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=3
args=()
while (($#)); do
  case "$1" in
    --rounds) rounds="$2"; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
deno=(deno)
command -v deno >/dev/null || deno=(npx deno)
bench=("${deno[@]}" run --allow-read --allow-write --allow-env --allow-ffi --allow-sys --allow-run bench/bench.ts
  --stage step --json)
read -r -a torch_ddp <<<"${TORCH_DDP:-/usr/bin/python3 bench/torch_ddp_step.py --procs 2 --threads 1 --stage step}"
have_torch=1
[[ -f bench/torch_ddp_step.py || -n "${TORCH_DDP:-}" ]] || { have_torch=0; echo "note: bench/torch_ddp_step.py missing: PyTorch DDP side skipped" >&2; }
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

run() { # side round command...
  local side="$1" r="$2"
  shift 2
  /usr/bin/time -v "$@" >"$tmp/$side.$r.jsonl" 2>"$tmp/$side.$r.time" || { cat "$tmp/$side.$r.time" >&2; exit 1; }
}
echo "load before: $(uptime)"
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores; rounds $rounds"
for ((r = 1; r <= rounds; r++)); do
  run ours_2x1 "$r" "${bench[@]}" --procs 2 --threads 1 --sync-bn false "${args[@]}"
  ((have_torch)) && run torch_ddp "$r" "${torch_ddp[@]}" "${args[@]}"
  run ours_1x2 "$r" "${bench[@]}" --threads 2 "${args[@]}"
  run ours_2x1_sync "$r" "${bench[@]}" --procs 2 --threads 1 --sync-bn true "${args[@]}"
done
echo "load after:  $(uptime)"

/usr/bin/python3 - "$tmp" "$rounds" <<'PY'
import json, os, re, statistics, sys
tmp, rounds = sys.argv[1], int(sys.argv[2])
sides = [s for s in ["ours_2x1", "ours_2x1_sync", "ours_1x2", "torch_ddp"] if os.path.exists(f"{tmp}/{s}.1.jsonl")]
def step(side, r):
    for line in open(f"{tmp}/{side}.{r}.jsonl"):
        if line.startswith("{"):
            j = json.loads(line)
            if j.get("stage") == "step":
                return j
    raise SystemExit(f"{side} round {r}: no step line")
def rss(side):
    best = 0.0
    for r in range(1, rounds + 1):
        m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", open(f"{tmp}/{side}.{r}.time").read())
        if m: best = max(best, int(m.group(1)) / 1024)
    return best
med = {}
print(f"\n| {'side':<14} | {'step ms per round':<28} | {'median ms':>9} | {'images/s':>9} | {'peak RSS MB':>11} |")
print(f"| {'-' * 14} | {'-' * 28} | --------: | --------: | ----------: |")
for side in sides:
    runs = [step(side, r) for r in range(1, rounds + 1)]
    ms = [j["ms"] for j in runs]
    med[side] = statistics.median(ms)
    ips = statistics.median(j["images_per_s"] for j in runs)
    print(f"| {side:<14} | {', '.join(f'{x:.0f}' for x in ms):<28} | {med[side]:>9.1f} | {ips:>9.1f} | {rss(side):>11.0f} |")
if "torch_ddp" in med:
    for side in ["ours_2x1", "ours_2x1_sync", "ours_1x2"]:
        print(f"throughput {side} / torch_ddp: {med['torch_ddp'] / med[side]:.2f}x")
if "ours_1x2" in med:
    print(f"scaling efficiency, 2 ranks x 1 thread vs 1 process x 2 threads: {med['ours_1x2'] / med['ours_2x1']:.2f}")
    print(f"synchronised batch norm costs {100 * (med['ours_2x1_sync'] / med['ours_2x1'] - 1):.1f} % of the 2-rank step")
PY
