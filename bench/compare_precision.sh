#!/usr/bin/env bash
# fp32 against bf16, ours and PyTorch's, on one configuration: per round the four sides one after the
# other (ours fp32, ours bf16, PyTorch fp32, PyTorch bf16 autocast), so a shared machine's drifting load
# falls on all four alike. Prints each side's median step ms over rounds, the ratios, every round's
# times and each side's peak resident memory (/usr/bin/time -v, the largest over rounds).
#
#   bench/compare_precision.sh [--rounds 3] [--threads 2] [--reps 3] [--width 16] [--batch 64]
#                              [--crops 2x32+4x16] [--hidden 2048] [--out 128] [--prototypes 3000]
#
# Every argument but --rounds goes to both bench/bench.ts and bench/torch_step.py (with --stage step).
set -euo pipefail
cd "$(dirname "$0")/.."
threads="${SWAV_THREADS:-$(nproc)}"
rounds=3
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
  for p in fp32 bf16; do
    SWAV_THREADS="$threads" /usr/bin/time -v "${deno[@]}" run --allow-read --allow-write --allow-env --allow-ffi \
      --allow-sys bench/bench.ts --json --stage step --precision "$p" "${args[@]}" >"$tmp/ours-$p.$r.jsonl" \
      2>"$tmp/ours-$p.$r.time" || { cat "$tmp/ours-$p.$r.time" >&2; exit 1; }
  done
  for p in fp32 bf16; do
    OMP_NUM_THREADS="$threads" /usr/bin/time -v /usr/bin/python3 bench/torch_step.py --stage step --precision "$p" \
      "${args[@]}" >"$tmp/torch-$p.$r.jsonl" 2>"$tmp/torch-$p.$r.time" || { cat "$tmp/torch-$p.$r.time" >&2; exit 1; }
  done
  echo "round $r done: $(uptime)"
done
echo "load after:  $(uptime)"

/usr/bin/python3 - "$tmp" "$rounds" <<'PY'
import json, re, statistics, sys
tmp, rounds = sys.argv[1], int(sys.argv[2])
sides = ["ours-fp32", "ours-bf16", "torch-fp32", "torch-bf16"]
def ms(side):
    out = []
    for r in range(1, rounds + 1):
        for line in open(f"{tmp}/{side}.{r}.jsonl"):
            if line.startswith("{"):
                j = json.loads(line)
                if j["stage"] == "step":
                    out.append(j["ms"])
                    if j.get("precision", "bf16" if side.endswith("bf16") else "fp32") != side.split("-")[1]:
                        sys.exit(f"{side}: ran {j.get('precision')}")
    return out
def rss(side):
    best = 0.0
    for r in range(1, rounds + 1):
        m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", open(f"{tmp}/{side}.{r}.time").read())
        if m: best = max(best, int(m.group(1)) / 1024)
    return best
times = {s: ms(s) for s in sides}
med = {s: statistics.median(times[s]) for s in sides}
print(f"\n| {'side':<10} | {'step ms per round':<26} | {'median':>7} | {'vs ours fp32':>12} | {'peak RSS MB':>11} |")
print(f"| {'-' * 10} | {'-' * 26} | ------: | -----------: | ----------: |")
for s in sides:
    print(f"| {s:<10} | {', '.join(f'{x:.0f}' for x in times[s]):<26} | {med[s]:>7.0f} | {med[s] / med['ours-fp32']:>11.2f}x | {rss(s):>11.0f} |")
print(f"\nours bf16 speed-up over ours fp32: {med['ours-fp32'] / med['ours-bf16']:.2f}x; "
      f"PyTorch bf16 over PyTorch fp32: {med['torch-fp32'] / med['torch-bf16']:.2f}x; "
      f"PyTorch bf16 ms / ours bf16 ms: {med['torch-bf16'] / med['ours-bf16']:.2f}")
PY
