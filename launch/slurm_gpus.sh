#!/usr/bin/env bash
# Multi-host GPU training under SLURM: one process per node, all of its GPUs per process.
#   sbatch --nodes=2 --gpus-per-node=4 launch/slurm_gpus.sh configs/celeba64.py /shared/runs/celeba64
# jax.distributed.initialize() reads the coordinator and process ids from SLURM's variables.
# SIGTERM at the time limit (e.g. --signal=TERM@120) makes the run checkpoint and exit 0;
# resubmitting the same command resumes it.
#SBATCH --ntasks-per-node=1
#SBATCH --signal=TERM@120
set -euo pipefail
CONFIG=${1:?config file}
WORKDIR=${2:?workdir on a shared filesystem}
srun python -m dmz_jax.main --distributed --config="$CONFIG" --workdir="$WORKDIR" "${@:3}"
