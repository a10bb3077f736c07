#!/usr/bin/env bash
# The four-column demo on real data: prune SmolLM2-135M-Instruct by 20% (Taylor), recover it twice with
# LoRA on the Alpaca-cleaned data (SFT, and distillation from the dense model, each RECOVERY_TIME seconds
# of training), and measure base / pruned / SFT / distillation: perplexity (WikiText-2 test, PTB
# validation, the demo's held-out docstrings, seq_len 128) and the seven zero-shot tasks, on the shared
# offline data. Budget (2 CPU cores): RECOVERY_TIME seconds per recovery (configs/demo.yaml, 16 records
# a step), LIMIT windows per perplexity text and examples per zero-shot task.
# The sweep of distillation settings and the equal-time comparison: python -m benchmarks.recover_kd.
# Usage: bash benchmarks/recover_smollm2.sh [RECOVERY_TIME] [LIMIT]   (from the repository root)
set -euo pipefail
RECOVERY_TIME=${1:-600}
LIMIT=${2:-64}
PYTHON=${PYTHON:-.venv/bin/python}
SHARED=../shared/data
WORK=results/recover_smollm2          # models and checkpoints (not committed)
OUT=benchmarks/results/recover_smollm2 # the numbers (committed)
"$PYTHON" -m lit_recover.demo --output_dir "$WORK" --recovery_time "$RECOVERY_TIME" --limit "$LIMIT" \
    --data_path "$SHARED/alpaca/alpaca_data_cleaned.json" \
    --ppl_data_dir "$SHARED/ppl" --zero_shot_data_dir "$SHARED/zeroshot"
mkdir -p "$OUT"
cp "$WORK/summary.md" "$WORK/demo_results.json" "$WORK/comparison.png" "$WORK/evaluation_settings.json" \
    "$WORK"/evaluation_{base,pruned,sft,distillation}.json "$OUT/"
cp "$WORK/recovered_sft/config.yaml" "$OUT/recover_config.yaml"
{
    echo
    echo "command: bash benchmarks/recover_smollm2.sh $RECOVERY_TIME $LIMIT"
    echo "hardware: $(lscpu | sed -n 's/^Model name:\s*//p'), $(nproc) cores; torch $("$PYTHON" -c 'import torch; print(torch.__version__)')"
} >> "$OUT/summary.md"
