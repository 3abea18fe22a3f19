#!/usr/bin/env bash
# GPU benchmark on the SD 2.1-base (512 px, fp16), SDXL (1024 px, fp16), FLUX.1-dev and
# Z-Image-Turbo (1024 px, bf16) architectures, random weights, no download. Needs torch with
# CUDA and the project's dependencies importable. ARCHES picks some (default: all four, in
# that order); other arguments go to every run. SD 2.1 took under 8 minutes on one H100; the
# SDXL, FLUX.1-dev and Z-Image-Turbo rows have not been run on a GPU yet (Z-Image-Turbo:
# 10B parameters, 20 GB in bf16; both pipelines resident at the serving rows' peak, about
# 45 GB of GPU memory by its parameter count, fits an 80 GB card).
#
# FLUX.1-dev (17B parameters), by its parameter count, not measured: about 70 GB of host
# memory while it is built in fp32, 34 GB of disk once saved in bf16, and about 80 GB of GPU
# memory at the serving rows' peak (our pipeline and stock diffusers' twin resident together,
# 34 GB each, plus activations): run it on an H200 (141 GB); on an 80 GB card, run
# ARCHES="sd21-base sdxl-base". 8 denoising steps, and 10 training steps with gradient
# checkpointing, keep its rows to minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
for arch in ${ARCHES:-sd21-base sdxl-base flux-dev zimage-turbo}; do
    case "$arch" in
        sd21-base) options=(--size 512 --steps 20 --train-steps 30 --dtype fp16) ;;
        sdxl-base) options=(--size 1024 --steps 20 --train-steps 30 --dtype fp16) ;;
        flux-dev | zimage-turbo) options=(--size 1024 --steps 8 --train-steps 10 --dtype bf16
                                          --gradient-checkpointing) ;;
        *) echo "unknown architecture $arch (sd21-base, sdxl-base, flux-dev, zimage-turbo)" >&2
           exit 2 ;;
    esac
    python3 -m bench.gpu --arch "$arch" "${options[@]}" --device cuda \
        --out "${OUT:-bench/results}" "$@"
done
