#!/usr/bin/env bash
# The GPU checks the issues ask for, in one run on one CUDA GPU (about 10 minutes, at most 15: each
# check is capped at 5 so a slow or failing one cannot starve the next). Not run yet: no GPU has been lent to
# the sessions that wrote this repo. Each check prints the numbers README's tables need, with the card.
#   bash benchmarks/gpu_checks.sh 2>&1 | tee gpu_checks.log
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1  # nothing is downloaded: random weights and synthetic data throughout
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || { echo "error: no CUDA GPU (nvidia-smi failed): these checks need one"; exit 1; }
check() { echo "== $*"; timeout 300 "$@" || echo "== FAILED or timed out ($?): $*"; }
# Qwen-Image-shaped transformer, 4 blocks (1.4B), FSDP2 on 1 GPU: measured memory against --plan
check torchrun --nproc_per_node 1 benchmarks/qwen_step_memory.py --layers 4
# ImageNet DiT-B/2 at 256 px (latents 4×32×32), bf16: images/s for flow and twinflow
check python benchmarks/step_cost.py --device cuda --bf16 --model dit --dit B/2 --batch 256 --steps 10
# CIFAR-10 UNet (gpu preset, 63M), bf16 + torch.compile: step time and peak memory per method
check python benchmarks/step_cost.py --device cuda --bf16 --compile --model unet --unet-preset gpu --batch 128 \
    --steps 5 --warmup 2
