#!/usr/bin/env bash
# Issue 7's GPU measurements in one run: the BERT-base merge target (1 M feature tokens, full method and vanilla,
# an 11-point curve on 1 M evaluation tokens, bf16 autocast) with float64 and with float32 statistics, then the
# correlation error and matching agreement of float32 products against float64 on the GPU, without and with TF32.
#
# Made for a lent machine with torch, Lightning and transformers but no internet and no `datasets`: the package is
# imported from the checkout, and the precision study reads token blocks saved beforehand, here, by
#
#     python benchmarks/statistics_precision.py --save-blocks runs/gpu_inputs/blocks.safetensors
#
# Carry runs/gpu_inputs and the quickstart models runs/study/quickstart/pretrain/seed{0,1}/hf (about 9 MB), then run
# `bash benchmarks/gpu.sh`. Results go to $OUT (or benchmarks/results): JSON per step, and log.txt with the tables.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec > >(tee "$out/log.txt") 2>&1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers, pytorch_lightning as pl; print('torch', torch.__version__,
    'transformers', transformers.__version__, 'lightning', pl.__version__)"

base=(--presets base --feature-tokens 1048576 --eval-tokens 1048576 --precision bf16-mixed --batch-size 256
      --statistics-batch-size 64)
python3 benchmarks/merge_pipeline.py "${base[@]}" --output "$out/merge_pipeline_base.json"
python3 benchmarks/merge_pipeline.py "${base[@]}" --statistics-dtype float32 \
    --output "$out/merge_pipeline_base_float32.json"

blocks=runs/gpu_inputs/blocks.safetensors
for precision in highest high; do  # high: float32 matmuls in TF32
    python3 benchmarks/statistics_precision.py --device cuda --blocks-file "$blocks" --matmul-precision "$precision" \
        --output "$out/statistics_precision_$precision.json"
done
