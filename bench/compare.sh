#!/usr/bin/env bash
# Runs bench/bench.ts (Deno, wasm + oneDNN/OpenBLAS) and bench/torch_step.py (Debian PyTorch) on the same
# configuration and threads, alternating the two sides for --rounds rounds, and prints per-stage times (the
# median over rounds of each run's median), the ratio torch_ms / ours_ms (> 1: ours is faster), every round's
# step time, and each side's peak resident memory (/usr/bin/time -v, the largest over rounds).
#
#   bench/compare.sh [--rounds 1] [--threads N] [--reps N] [--stage NAME] [--width 16] [--batch 64]
#                    [--crops 2x32+4x16] [--hidden 2048] [--out 128] [--prototypes 3000] [--precision bf16]
#
# Every argument but --rounds is passed to both sides (--precision bf16: ours with oneDNN bf16 convolutions,
# PyTorch with its forward under torch.autocast("cpu", dtype=torch.bfloat16)). The machine's load (uptime) is printed before and
# after. PyTorch's times on this VM vary by up to 2x from one process to the next (its allocator returns
# memory to the system and faults it back in): use several rounds.
set -euo pipefail
cd "$(dirname "$0")/.."
threads="${SWAV_THREADS:-$(nproc)}"
rounds=1
args=()
while (($#)); do
  case "$1" in
    --rounds) rounds="$2"; shift 2 ;;
    --threads) threads="$2"; args+=("$1" "$2"); shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
if [[ " ${args[*]:-} " != *" --threads "* ]]; then args+=(--threads "$threads"); fi
deno=(deno)
command -v deno >/dev/null || deno=(npx deno)
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

echo "load before: $(uptime)"
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores; threads $threads; rounds $rounds"
for ((r = 1; r <= rounds; r++)); do
  SWAV_THREADS="$threads" /usr/bin/time -v "${deno[@]}" run --allow-read --allow-write --allow-env --allow-ffi \
    --allow-sys bench/bench.ts --json "${args[@]}" >"$tmp/ours.$r.jsonl" 2>"$tmp/ours.$r.time" ||
    { cat "$tmp/ours.$r.time" >&2; exit 1; }
  OMP_NUM_THREADS="$threads" /usr/bin/time -v /usr/bin/python3 bench/torch_step.py "${args[@]}" \
    >"$tmp/torch.$r.jsonl" 2>"$tmp/torch.$r.time" || { cat "$tmp/torch.$r.time" >&2; exit 1; }
done
echo "load after:  $(uptime)"

/usr/bin/python3 - "$tmp" "$rounds" <<'PY'
import json, re, statistics, sys
tmp, rounds = sys.argv[1], int(sys.argv[2])
def runs(side):
    out = []
    for r in range(1, rounds + 1):
        out.append({j["stage"]: j for j in (json.loads(l) for l in open(f"{tmp}/{side}.{r}.jsonl") if l.startswith("{"))})
    return out
def rss(side):
    best = 0.0
    for r in range(1, rounds + 1):
        m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", open(f"{tmp}/{side}.{r}.time").read())
        if m: best = max(best, int(m.group(1)) / 1024)
    return best
ours, torch = runs("ours"), runs("torch")
def med(rs, stage):
    xs = [r[stage]["ms"] for r in rs if stage in r]
    return statistics.median(xs) if xs else float("nan")
print(f"\n| {'stage':<16} | {'ours ms':>9} | {'torch ms':>9} | {'torch/ours':>10} |")
print(f"| {'-' * 16} | --------: | --------: | ---------: |")
for stage in ours[0]:
    o, t = med(ours, stage), med(torch, stage)
    ratio = f"{t / o:.2f}" if o > 0 and t == t else "-"
    print(f"| {stage:<16} | {o:>9.1f} | {t:>9.1f} | {ratio:>10} |")
print(f"\npeak RSS (largest over rounds): ours {rss('ours'):.0f} MB, torch {rss('torch'):.0f} MB")
if "step" in ours[0] and "step" in torch[0]:
    print("step ms per round: ours " + ", ".join(f"{r['step']['ms']:.0f}" for r in ours)
          + "; torch " + ", ".join(f"{r['step']['ms']:.0f}" for r in torch))
    print(f"step ratio (torch ms / ours ms, medians over rounds): {med(torch, 'step') / med(ours, 'step'):.2f}")
PY
