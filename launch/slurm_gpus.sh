#!/usr/bin/env bash
# Multi-node GPU training under SLURM. From the repository root on a login node,
#   NODES=2 GPUS_PER_NODE=4 launch/slurm_gpus.sh configs/celeba64.py /shared/runs/celeba64
# submits this script with sbatch; inside the job (or inside an salloc allocation) it runs
#   srun ... python -m dmz_jax.main --distributed --config=CONFIG --workdir=WORKDIR [FLAGS...]
# on every node. --distributed calls jax.distributed.initialize(), which reads SLURM_JOB_ID,
# SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID and SLURM_LOCALID: the coordinator is the first
# node, on a port derived from the job id (JAX_COORDINATOR_PORT overrides it).
# `sbatch --nodes=2 --gpus-per-node=4 launch/slurm_gpus.sh CONFIG WORKDIR` works too.
#
# Needs: sbatch and srun; on every node the same python with this repository and CUDA jax,
# e.g. a venv on the shared filesystem (python3 -m venv .venv && .venv/bin/pip install -e .
# "jax[cuda12]"; then PYTHON=$PWD/.venv/bin/python); nodes that reach each other over TCP;
# WORKDIR and the data on a filesystem that every node sees. The job starts in the directory
# you submit from, so relative paths mean the same as here.
# Processes: TASKS_PER=node (default) runs one process per node that drives all of its GPUs
# (JAX_LOCAL_DEVICE_IDS=0,...,G-1: JAX would otherwise give each SLURM task GPU SLURM_LOCALID
# only); TASKS_PER=gpu runs one process per GPU (JAX picks GPU SLURM_LOCALID). Either way every
# task must see all the GPUs of its node: add no --gpus-per-task or --gpu-bind.
# training.batch_size must be divisible by the number of GPUs and of processes.
# SLURM sends SIGTERM 120 s before the time limit: the run checkpoints and exits 0; submitting
# the same command again resumes it.
#
# Environment:
#   NODES, GPUS_PER_NODE  the job's size (needed to submit; inside a job GPUS_PER_NODE defaults
#                         to SLURM_GPUS_ON_NODE)
#   TASKS_PER             node (default) or gpu
#   PYTHON                the python on the nodes (default python)
#   EXTRA_SBATCH          more sbatch options, split at spaces: "--partition=gpu --time=24:00:00"
#   DRY_RUN=1             the same as --dry-run
#SBATCH --ntasks-per-node=1
#SBATCH --signal=TERM@120
set -euo pipefail

USAGE='Usage: NODES=N GPUS_PER_NODE=G launch/slurm_gpus.sh [--dry-run] CONFIG WORKDIR [FLAGS...]
  --dry-run  print every command, one per line, instead of running it (or DRY_RUN=1): the
             sbatch command, then the srun command that the job runs
  FLAGS      passed on to python -m dmz_jax.main, e.g. --config.training.batch_size=256
Example:
  NODES=2 GPUS_PER_NODE=4 EXTRA_SBATCH="--time=24:00:00" launch/slurm_gpus.sh \
      configs/celeba64.py /shared/runs/celeba64'
usage() { printf '%s\n' "$USAGE"; }
die() { echo "slurm_gpus.sh: $*" >&2; usage >&2; exit 2; }

DRY_RUN=${DRY_RUN:-0}
quote() {  # one word as the shell needs it: bare, '...', "..." or '...'\''...'
  local w=$1 opt=''
  if [[ $w =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then printf '%s' "$w"; return; fi
  if [[ $w =~ ^(--[A-Za-z0-9_.-]+=)(.*)$ ]]; then opt=${BASH_REMATCH[1]} w=${BASH_REMATCH[2]}; fi
  if [[ $w != *\'* ]]; then printf "%s'%s'" "$opt" "$w"
  elif [[ $w != *[\"\$\`\\!]* ]]; then printf '%s"%s"' "$opt" "$w"
  else printf "%s'%s'" "$opt" "${w//\'/\'\\\'\'}"; fi
}
line() { local w s=''; for w in "$@"; do s+="${s:+ }$(quote "$w")"; done; printf '%s\n' "$s"; }
run() { if [[ $DRY_RUN == 1 ]]; then line "$@"; else echo "+ $(line "$@")" >&2; "$@"; fi; }

while [[ $# -gt 0 && $1 == -* ]]; do
  case $1 in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option $1" ;;
  esac
  shift
done
[[ $# -ge 2 ]] || die "missing arguments: need CONFIG WORKDIR"
CONFIG=$1 WORKDIR=$2
shift 2
[[ -f ${CONFIG%%:*} ]] || die "no config file ${CONFIG%%:*} (run from the repository root)"
TASKS_PER=${TASKS_PER:-node}
[[ $TASKS_PER == node || $TASKS_PER == gpu ]] || die "TASKS_PER must be node or gpu, not '$TASKS_PER'"
PYTHON=${PYTHON:-python}
IN_JOB=${SLURM_JOB_ID:+1}
if [[ -n $IN_JOB ]]; then G=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}; else G=${GPUS_PER_NODE:-}; fi
[[ $G =~ ^[1-9][0-9]*$ ]] || die "set GPUS_PER_NODE to the number of GPUs of each node (a number)"

train() {  # the job step: one process per node or per GPU, on every node of the allocation
  local step=(srun --kill-on-bad-exit=1)
  if [[ $TASKS_PER == node ]]; then
    local ids=0 i
    for ((i = 1; i < G; i++)); do ids+=,$i; done
    step+=(--ntasks-per-node=1 env JAX_LOCAL_DEVICE_IDS="$ids")
  else
    step+=(--ntasks-per-node="$G")
  fi
  run "${step[@]}" "$PYTHON" -m dmz_jax.main --distributed --config="$CONFIG" --workdir="$WORKDIR" "$@"
}

if [[ -n $IN_JOB ]]; then train "$@"; exit; fi

[[ ${NODES:-} =~ ^[1-9][0-9]*$ ]] || die "set NODES to the number of nodes (a number)"
if [[ $TASKS_PER == node ]]; then T=1; else T=$G; fi
read -ra EXTRA <<< "${EXTRA_SBATCH:-}"
run sbatch --job-name=dmz_jax --nodes="$NODES" --gpus-per-node="$G" --ntasks-per-node="$T" \
  --signal=TERM@120 --export="ALL,GPUS_PER_NODE=$G,TASKS_PER=$TASKS_PER,PYTHON=$PYTHON" \
  ${EXTRA[@]+"${EXTRA[@]}"} "${BASH_SOURCE[0]}" "$CONFIG" "$WORKDIR" "$@"
if [[ $DRY_RUN == 1 ]]; then train "$@"; fi
