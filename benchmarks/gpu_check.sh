#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): lit-recover and the reference recipe at LLaMA-7B shapes on
# one GPU, offline, within 8 minutes. Installs the carried wheels that the machine lacks
# (benchmarks/gpu_wheels.txt, fetched beforehand by `make gpu-wheels` into benchmarks/.gpu_wheels/),
# runs the check and keeps its output beside the results JSON.
#
#   bash benchmarks/gpu_check.sh                       # on the GPU machine
#   bash benchmarks/gpu_check.sh --dry-run             # tiny shapes on the CPU, anywhere
#   bash benchmarks/gpu_check.sh --out /some/dir/gpu_check.json
#
# PYTHON (default python3) is the interpreter that holds torch; GPU_CHECK_SITE (default
# /tmp/lit-recover-gpu-site) is where the wheels go, put first on PYTHONPATH for this run only.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
SITE=${GPU_CHECK_SITE:-/tmp/lit-recover-gpu-site}

out=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[$i]}" in
        --out) out=${args[$((i + 1))]:-} ;;
        --out=*) out=${args[$i]#--out=} ;;
        --dry-run) dry=1 ;;
    esac
done
if [[ -z "$out" ]]; then
    out=benchmarks/results/gpu_check${dry:+_dry}.json
    args+=(--out "$out")
fi
mkdir -p "$(dirname "$out")"

"$PYTHON" -m benchmarks.gpu_wheels install --target "$SITE"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled
"$PYTHON" -m benchmarks.gpu_check "${args[@]}" 2>&1 | tee "${out%.json}.log"
