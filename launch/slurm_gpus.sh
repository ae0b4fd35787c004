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
# Requeue: SLURM sends SIGTERM 120 s before the time limit (and on preemption); the run writes a
# checkpoint and exits 75. When the job step ends with 75, or 76 (a process of the job was
# lost: a node failed or was killed), the job asks SLURM to requeue it (scontrol requeue; the
# job is submitted with --requeue), at most MAX_RESTARTS times (SLURM_RESTART_COUNT counts
# them), and the requeued job resumes from the newest checkpoint. The job log is appended to
# (--open-mode=append), not overwritten, by a requeued run. srun reports the highest exit
# status of its tasks and does not kill the other tasks when one fails (--kill-on-bad-exit=0:
# a preempted task's exit 75 must not kill the others while they finish their checkpoint); a
# task that crashes makes the others exit 76 within JAX's heartbeat timeout + 60 s.
#
# Environment:
#   NODES, GPUS_PER_NODE  the job's size (needed to submit; inside a job GPUS_PER_NODE defaults
#                         to SLURM_GPUS_ON_NODE)
#   TASKS_PER             node (default) or gpu
#   PYTHON                the python on the nodes (default python)
#   MAX_RESTARTS          requeues after exit 75 or 76 (default 3; 0: never)
#   EXTRA_SBATCH          more sbatch options, split at spaces: "--partition=gpu --time=24:00:00"
#   DRY_RUN=1             the same as --dry-run
#SBATCH --ntasks-per-node=1
#SBATCH --signal=TERM@120
#SBATCH --requeue
#SBATCH --open-mode=append
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
[[ ${MAX_RESTARTS:=3} =~ ^[0-9]+$ ]] || die "MAX_RESTARTS must be a number, not '$MAX_RESTARTS'"
IN_JOB=${SLURM_JOB_ID:+1}
if [[ -n $IN_JOB ]]; then G=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}; else G=${GPUS_PER_NODE:-}; fi
[[ $G =~ ^[1-9][0-9]*$ ]] || die "set GPUS_PER_NODE to the number of GPUs of each node (a number)"

train() {  # the job step: one process per node or per GPU, on every node of the allocation
  local step=(srun --kill-on-bad-exit=0)
  if [[ $TASKS_PER == node ]]; then
    local ids=0 i
    for ((i = 1; i < G; i++)); do ids+=,$i; done
    step+=(--ntasks-per-node=1 env JAX_LOCAL_DEVICE_IDS="$ids")
  else
    step+=(--ntasks-per-node="$G")
  fi
  run "${step[@]}" "$PYTHON" -m dmz_jax.main --distributed --config="$CONFIG" --workdir="$WORKDIR" "$@"
}

EXIT_PREEMPTED=75  # dmz_jax.preemption.EXIT_PREEMPTED: stopped by a signal, checkpoint written
EXIT_PEER_LOST=76  # dmz_jax.preemption.EXIT_PEER_LOST: another process of the job was lost
requeue_or_exit() {  # after the job step ended with $1: requeue this job on 75 or 76, or exit
  local rc=$1 done=${SLURM_RESTART_COUNT:-0}
  if [[ $rc != "$EXIT_PREEMPTED" && $rc != "$EXIT_PEER_LOST" ]]; then exit "$rc"; fi
  if ((done >= MAX_RESTARTS)); then
    echo "slurm_gpus.sh: training exited $rc after $done requeue(s) (MAX_RESTARTS); submit" \
      "the same command again to resume from the last checkpoint" >&2
    exit "$rc"
  fi
  echo "slurm_gpus.sh: training exited $rc; requeue $((done + 1)) of $MAX_RESTARTS" >&2
  if run scontrol requeue "$SLURM_JOB_ID"; then exit 0; fi
  echo "slurm_gpus.sh: scontrol requeue failed; submit the same command again to resume" >&2
  exit "$rc"
}

if [[ -n $IN_JOB ]]; then
  rc=0
  train "$@" || rc=$?
  requeue_or_exit "$rc"
fi

[[ ${NODES:-} =~ ^[1-9][0-9]*$ ]] || die "set NODES to the number of nodes (a number)"
if [[ $TASKS_PER == node ]]; then T=1; else T=$G; fi
read -ra EXTRA <<< "${EXTRA_SBATCH:-}"
run sbatch --job-name=dmz_jax --nodes="$NODES" --gpus-per-node="$G" --ntasks-per-node="$T" \
  --signal=TERM@120 --requeue --open-mode=append \
  --export="ALL,GPUS_PER_NODE=$G,TASKS_PER=$TASKS_PER,PYTHON=$PYTHON,MAX_RESTARTS=$MAX_RESTARTS" \
  ${EXTRA[@]+"${EXTRA[@]}"} "${BASH_SOURCE[0]}" "$CONFIG" "$WORKDIR" "$@"
if [[ $DRY_RUN == 1 ]]; then train "$@"; fi
