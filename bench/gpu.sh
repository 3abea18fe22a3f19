#!/usr/bin/env bash
# GPU benchmark on the SD 2.1-base architecture (random weights, no download), under 8 minutes
# on one H100. Needs torch with CUDA and the project's dependencies importable.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
python3 -m bench.gpu --arch sd21-base --size 512 --steps 20 --train-steps 30 --dtype fp16 \
    --device cuda --out "${OUT:-bench/results}" "$@"
