#!/usr/bin/env bash
# Prune SmolLM2-135M-Instruct by 20% (Taylor), recover it with LoRA on the Alpaca-cleaned data, and
# measure base / pruned / recovered: perplexity (WikiText-2 test, PTB validation, seq_len 128) and the
# seven zero-shot tasks, on the shared offline data. Budget (2 CPU cores): STEPS optimizer steps of
# 16 records (configs/demo.yaml), LIMIT windows per perplexity text and examples per zero-shot task.
# Usage: bash benchmarks/recover_smollm2.sh [STEPS] [LIMIT]   (from the repository root)
set -euo pipefail
STEPS=${1:-32}
LIMIT=${2:-64}
SHARED=../shared/data
WORK=results/recover_smollm2          # models and checkpoints (not committed)
OUT=benchmarks/results/recover_smollm2 # the numbers (committed)
python -m lit_recover.demo --output_dir "$WORK" --max_steps "$STEPS" --limit "$LIMIT" \
    --data_path "$SHARED/alpaca/alpaca_data_cleaned.json" \
    --ppl_data_dir "$SHARED/ppl" --zero_shot_data_dir "$SHARED/zeroshot"
mkdir -p "$OUT"
cp "$WORK/summary.md" "$WORK/evaluation_base.json" "$OUT/"
cp "$WORK/recovered/evaluation/evaluation_results.json" "$OUT/evaluation_pruned_recovered.json"
cp "$WORK/recovered/config.yaml" "$OUT/recover_config.yaml"
echo "command: bash benchmarks/recover_smollm2.sh $STEPS $LIMIT" >> "$OUT/summary.md"
echo "hardware: $(lscpu | sed -n 's/^Model name:\s*//p'), $(nproc) cores; torch $(python -c 'import torch; print(torch.__version__)')" >> "$OUT/summary.md"
