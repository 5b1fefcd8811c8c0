#!/usr/bin/env bash
# Runs bench/bench.ts (Deno, wasm + OpenBLAS) and bench/torch_step.py (Debian PyTorch) on the same
# configuration and threads, one after the other in one go, and prints per-stage times and the ratio
# torch_ms / ours_ms (> 1: ours is faster), plus each side's peak resident memory (/usr/bin/time -v).
#
#   bench/compare.sh [--threads N] [--reps N] [--stage NAME] [--width 16] [--batch 64] [--crops 2x32+4x16]
#                    [--hidden 2048] [--out 128] [--prototypes 3000]
#
# Every argument is passed to both sides. The machine's load (uptime) is printed before and after:
# compare ratios from one run, not absolute times across runs.
set -euo pipefail
cd "$(dirname "$0")/.."
threads="${SWAV_THREADS:-$(nproc)}"
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  if [[ "${args[$i]}" == "--threads" ]]; then threads="${args[$((i + 1))]}"; fi
done
if [[ " ${args[*]:-} " != *" --threads "* ]]; then args+=(--threads "$threads"); fi
deno=(deno)
command -v deno >/dev/null || deno=(npx deno)
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

echo "load before: $(uptime)"
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores; threads $threads"
/usr/bin/time -v "${deno[@]}" run --allow-read --allow-write --allow-env --allow-ffi --allow-sys \
  bench/bench.ts --json "${args[@]}" >"$tmp/ours.jsonl" 2>"$tmp/ours.time" || { cat "$tmp/ours.time" >&2; exit 1; }
OMP_NUM_THREADS="$threads" /usr/bin/time -v /usr/bin/python3 bench/torch_step.py "${args[@]}" \
  >"$tmp/torch.jsonl" 2>"$tmp/torch.time" || { cat "$tmp/torch.time" >&2; exit 1; }
echo "load after:  $(uptime)"

/usr/bin/python3 - "$tmp" <<'PY'
import json, re, sys
tmp = sys.argv[1]
def lines(name):
    return {r["stage"]: r for r in (json.loads(l) for l in open(f"{tmp}/{name}.jsonl") if l.startswith("{"))}
def rss(name):
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", open(f"{tmp}/{name}.time").read())
    return int(m.group(1)) / 1024 if m else float("nan")
ours, torch = lines("ours"), lines("torch")
print(f"\n| {'stage':<16} | {'ours ms':>9} | {'torch ms':>9} | {'torch/ours':>10} |")
print(f"| {'-' * 16} | --------: | --------: | ---------: |")
for stage, r in ours.items():
    t = torch.get(stage)
    ratio = f"{t['ms'] / r['ms']:.2f}" if t and r["ms"] > 0 else "-"
    print(f"| {stage:<16} | {r['ms']:>9.1f} | {(t['ms'] if t else float('nan')):>9.1f} | {ratio:>10} |")
print(f"\npeak RSS: ours {rss('ours'):.0f} MB, torch {rss('torch'):.0f} MB")
if "step" in ours and "step" in torch:
    print(f"step ratio (torch ms / ours ms): {torch['step']['ms'] / ours['step']['ms']:.2f}")
PY
