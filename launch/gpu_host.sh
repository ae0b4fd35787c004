#!/usr/bin/env bash
# Train on one machine with several GPUs: one process sees every local GPU and jax.jit splits
# each batch over them (the "data" axis of the mesh). No --distributed and no launcher: there
# is a single process.
#
# Needs: an NVIDIA driver, and this repository installed with CUDA-enabled JAX in the python
# that runs it (PYTHON; activate the venv first), e.g.
#   python3 -m venv .venv && .venv/bin/pip install -e . "jax[cuda12]"     (or use --install)
# jax[cuda12] brings CUDA and cuDNN as pip wheels and needs only the driver (jax[cuda13] for
# CUDA 13 drivers). Check with: python -c "import jax; print(jax.devices())".
# training.batch_size must be divisible by the number of GPUs (checked before compiling).
# Restarts: when training exits 75 (stopped by SIGTERM/SIGINT/SIGHUP after writing a
# checkpoint) or 76 (another process of the job was lost), the same command is run again, at
# most MAX_RESTARTS times: it resumes from the newest checkpoint. Any other failure ends this
# script with training's exit status.
#
# Environment:
#   GPUS=0,1,2,3     which GPUs (sets CUDA_VISIBLE_DEVICES; default: all of them)
#   MEM_FRACTION     XLA_PYTHON_CLIENT_MEM_FRACTION, the share of each GPU's memory that JAX
#                    takes at start-up (JAX's default 0.75); lower it to share the GPUs, or set
#                    XLA_PYTHON_CLIENT_PREALLOCATE=false yourself to allocate on demand
#   PYTHON           the python to run (default python)
#   JAX_CUDA         pip requirement used by --install (default jax[cuda12])
#   MAX_RESTARTS     reruns after exit 75 or 76 (default 3; 0: never)
#   DRY_RUN=1        the same as --dry-run
set -euo pipefail

USAGE='Usage: launch/gpu_host.sh [--dry-run] [--install] CONFIG WORKDIR [FLAGS...]
  --dry-run  print every command, one per line, instead of running it (or DRY_RUN=1)
  --install  first pip install this repository and CUDA jax into PYTHON
  FLAGS      passed on to python -m dmz_jax.main, e.g. --config.training.batch_size=256
Example:
  GPUS=0,1,2,3 MEM_FRACTION=.9 launch/gpu_host.sh configs/cifar10.py runs/cifar10'
usage() { printf '%s\n' "$USAGE"; }
die() { echo "gpu_host.sh: $*" >&2; usage >&2; exit 2; }

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

EXIT_PREEMPTED=75  # dmz_jax.preemption.EXIT_PREEMPTED: stopped by a signal, checkpoint written
EXIT_PEER_LOST=76  # dmz_jax.preemption.EXIT_PEER_LOST: another process of the job was lost
run_with_restarts() {  # the command; again after exit 75 or 76, at most MAX_RESTARTS times
  local attempt=0 rc
  while true; do
    rc=0
    run "$@" || rc=$?
    if [[ $rc != "$EXIT_PREEMPTED" && $rc != "$EXIT_PEER_LOST" ]]; then return "$rc"; fi
    if ((attempt >= MAX_RESTARTS)); then
      echo "gpu_host.sh: training exited $rc after $attempt restart(s) (MAX_RESTARTS);" \
        "rerun the same command to resume from the last checkpoint" >&2
      return "$rc"
    fi
    attempt=$((attempt + 1))
    echo "gpu_host.sh: training exited $rc; restart $attempt of $MAX_RESTARTS" >&2
  done
}

INSTALL=0
while [[ $# -gt 0 && $1 == -* ]]; do
  case $1 in
    --dry-run) DRY_RUN=1 ;;
    --install) INSTALL=1 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option $1" ;;
  esac
  shift
done
[[ $# -ge 2 ]] || die "missing arguments: need CONFIG WORKDIR"
CONFIG=$1 WORKDIR=$2
shift 2
[[ -f ${CONFIG%%:*} ]] || die "no config file ${CONFIG%%:*} (run from the repository root)"
[[ ${GPUS:-0} =~ ^[0-9]+(,[0-9]+)*$ ]] || die "GPUS must be GPU indices like 0,1,2,3, not '$GPUS'"
[[ ${MAX_RESTARTS:=3} =~ ^[0-9]+$ ]] || die "MAX_RESTARTS must be a number, not '$MAX_RESTARTS'"
[[ ${MEM_FRACTION:-.5} =~ ^(0?\.[0-9]*[1-9][0-9]*|1(\.0*)?)$ ]] \
  || die "MEM_FRACTION must be in (0, 1], not '$MEM_FRACTION'"
PYTHON=${PYTHON:-python}

if [[ $INSTALL == 1 ]]; then
  ROOT=$(cd "${BASH_SOURCE[0]%/*}/.." && pwd)
  run "$PYTHON" -m pip install -e "$ROOT" "${JAX_CUDA:-jax[cuda12]}"
fi
ENV=()
if [[ -n ${GPUS:-} ]]; then ENV+=(CUDA_VISIBLE_DEVICES="$GPUS"); fi
if [[ -n ${MEM_FRACTION:-} ]]; then ENV+=(XLA_PYTHON_CLIENT_MEM_FRACTION="$MEM_FRACTION"); fi
TRAIN=("$PYTHON" -m dmz_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@")
if [[ ${#ENV[@]} -gt 0 ]]; then TRAIN=(env "${ENV[@]}" "${TRAIN[@]}"); fi
run_with_restarts "${TRAIN[@]}"
