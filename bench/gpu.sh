#!/usr/bin/env bash
# GPU benchmark on the SD 2.1-base (512 px) and SDXL (1024 px) architectures, random weights,
# no download. Needs torch with CUDA and the project's dependencies importable. SD 2.1 took
# under 8 minutes on one H100; the SDXL rows have not been run on a GPU yet.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
python3 -m bench.gpu --arch sd21-base --size 512 --steps 20 --train-steps 30 --dtype fp16 \
    --device cuda --out "${OUT:-bench/results}" "$@"
python3 -m bench.gpu --arch sdxl-base --size 1024 --steps 20 --train-steps 30 --dtype fp16 \
    --device cuda --out "${OUT:-bench/results}" "$@"
