#!/usr/bin/env bash
# Quality benchmark: SwAV on Fashion-MNIST with bench/configs/fashion-mnist.json, ours and the
# PyTorch reference (bench/fashion_mnist_reference.py), same epochs, same CPU threads; kNN top-1
# (k 200, T 0.1) of the backbone after training. Long on a 2-core machine: run it under nohup.
#
#   bench/quality.sh [EPOCHS] [THREADS]      logs and results under runs/quality-<epochs>ep/ (an earlier
#   run of the same epochs moves into ours/previous-N)
set -euo pipefail
cd "$(dirname "$0")/.."
epochs="${1:-2}"
threads="${2:-2}"
out="runs/quality-${epochs}ep"
mkdir -p "$out"
start=$(date +%s)
npx deno task pretrain --config bench/configs/fashion-mnist.json --epochs "$epochs" --out "$out/ours" --force \
  >"$out/ours-pretrain.log" 2>&1
npx deno task eval --checkpoint "$out/ours" --method knn --json >"$out/ours-knn.json" 2>"$out/ours-eval.log"
echo "ours: $(( $(date +%s) - start )) s, $(tail -n 1 "$out/ours-knn.json")"
start=$(date +%s)
/usr/bin/python3 bench/fashion_mnist_reference.py --epochs "$epochs" --threads "$threads" \
  --out "$out/reference.jsonl" >"$out/reference.log" 2>&1
echo "reference: $(( $(date +%s) - start )) s, $(tail -n 1 "$out/reference.jsonl")"
