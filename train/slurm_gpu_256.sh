#!/usr/bin/env bash
# A SLURM cluster through Hydra's submitit launcher (pip install 'cfexplain[slurm]').
# Each job is one node; tasks_per_node GPUs train with DDP (submitit sets the rank variables).
#   bash train/slurm_gpu_256.sh +dataset=knee data.root=/data/knee_kl hydra.launcher.partition=gpu
set -euo pipefail
GPUS="${GPUS:-4}"
exec python -m cfexplain.train --multirun preset=gpu_256 launcher=slurm \
  hydra.launcher.gpus_per_node="$GPUS" hydra.launcher.tasks_per_node="$GPUS" "$@"
