#!/usr/bin/env bash
# One multi-GPU machine, paper-scale settings: every stage runs under DDP (nccl), rank 0 writes.
#   bash train/torchrun_gpu_256.sh +dataset=knee data.root=/data/knee_kl    # extra overrides pass through
set -euo pipefail
NPROC="${NPROC:-$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')}"
exec torchrun --standalone --nproc_per_node="$NPROC" -m cfexplain.train preset=gpu_256 "$@"
