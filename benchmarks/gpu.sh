#!/usr/bin/env bash
# Issue 7's GPU measurements in one run: the BERT-base merge target (its 30522-word vocabulary; 1 M feature tokens,
# full method and vanilla, an 11-point curve on 1 M evaluation tokens, bf16 autocast) with float64 and with float32
# statistics, then the correlation error and matching agreement of float32 products against float64 on the GPU,
# without and with TF32.
#
# Made for a lent machine with torch, Lightning and transformers but no internet and no `datasets`: the package is
# imported from the checkout, and the precision study reads token blocks saved beforehand, here, by
#
#     python benchmarks/statistics_precision.py --save-blocks runs/gpu_inputs/blocks.safetensors
#
# Carry runs/gpu_inputs and the quickstart models runs/study/quickstart/pretrain/seed{0,1}/hf (about 9 MB), then run
# `bash benchmarks/gpu.sh`. Results go to $OUT (or benchmarks/results): JSON per step, and log.txt with the tables.
# A failed step does not stop the later ones (device time is scarce); the exit status says whether any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
blocks=runs/gpu_inputs/blocks.safetensors
models=runs/study/quickstart/pretrain
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

main() {
    local failed=0
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || failed=1
    python3 -c "import torch, transformers, pytorch_lightning as pl; print('torch', torch.__version__,
        'transformers', transformers.__version__, 'lightning', pl.__version__)" || failed=1

    local base=(--presets base --vocab 30522 --feature-tokens 1048576 --eval-tokens 1048576 --precision bf16-mixed
                --batch-size 256 --statistics-batch-size 64)
    python3 benchmarks/merge_pipeline.py "${base[@]}" --statistics-dtype float64 --output "$out/merge_pipeline_base.json" || failed=1
    python3 benchmarks/merge_pipeline.py "${base[@]}" --statistics-dtype float32 \
        --output "$out/merge_pipeline_base_float32.json" || failed=1

    for precision in highest high; do  # high: float32 matmuls in TF32
        python3 benchmarks/statistics_precision.py --device cuda --blocks-file "$blocks" \
            --model-a "$models/seed0/hf" --model-b "$models/seed1/hf" --matmul-precision "$precision" \
            --output "$out/statistics_precision_$precision.json" || failed=1
    done
    return "$failed"
}

for needed in "$blocks" "$models/seed0/hf/config.json" "$models/seed1/hf/config.json"; do
    [[ -e "$needed" ]] || { echo "error: $needed is missing; prepare and carry it (see the header)" >&2; exit 2; }
done
mkdir -p "$out"
main 2>&1 | tee "$out/log.txt"
