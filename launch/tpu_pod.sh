#!/usr/bin/env bash
# Train on a Cloud TPU VM or pod slice: create it (--create), copy this repository to every
# worker, install it with jax[tpu], run the same training command on all workers with
# --distributed (jax.distributed.initialize() finds the other workers from the TPU metadata),
# copy WORKDIR back from worker 0, delete the TPU (--delete). Stops at the first failing step
# (the TPU is then kept). Run it from a terminal that stays open (tmux): training runs inside
# `gcloud ... ssh --worker=all`.
#
# Needs here: gcloud, logged in (gcloud auth login), with a project (gcloud config set project P,
# or PROJECT=P) that has TPU quota in ZONE; tar (unless REPO_URL). On the workers: the TPU VM
# image's python3 with pip, and git if REPO_URL. On a multi-host slice (more than one worker,
# e.g. v4-16 and up) WORKDIR must be one folder all workers see (a Filestore/NFS or gcsfuse
# mount), and so must the data (--config.data.data_dir=gs://...); configs/fashion_mnist.py
# reads the subset shipped in the package and needs no data.
#
# Environment:
#   ACCELERATOR_TYPE  TPU type, needed with --create: v4-8, v4-32, v5litepod-16, v6e-8, ...
#   RUNTIME_VERSION   TPU VM image (default tpu-ubuntu2204-base; v5e: v2-alpha-tpuv5-lite,
#                     v6e: v2-alpha-tpuv6e)
#   PROJECT           gcloud project (default: gcloud's configured one)
#   SPOT=1            create a Spot TPU; a preemption sends SIGTERM, the run checkpoints, and
#                     running this script again resumes it
#   REPO_URL          git clone (or pull) this URL on every worker instead of copying this tree
#   REMOTE_DIR        the code's folder on the workers, relative to home (default dmz_jax);
#                     a relative WORKDIR is relative to it
#   PYTHON            python on the workers (default python3; Ubuntu has no `python`)
#   JAX_TPU           pip requirement for TPU support (default jax[tpu]; pip keeps
#                     pyproject.toml's jax version)
#   FETCH_TO          local folder that receives WORKDIR (default runs/tpu-TPU_NAME)
#   DRY_RUN=1         the same as --dry-run
set -euo pipefail

USAGE='Usage: launch/tpu_pod.sh [--dry-run] [--create] [--delete] [--skip-setup]
                         TPU_NAME ZONE CONFIG WORKDIR [FLAGS...]
  --dry-run     print every command, one per line, instead of running it (or DRY_RUN=1)
  --create      create the TPU VM first (needs ACCELERATOR_TYPE)
  --delete      delete the TPU VM at the end
  --skip-setup  do not copy or install the code (done by an earlier call)
  CONFIG        a config of this repository, e.g. configs/celeba64.py or configs/cifar10.py:tiny
  FLAGS         passed on to python -m dmz_jax.main, e.g. --config.training.batch_size=256
Example:
  ACCELERATOR_TYPE=v4-32 launch/tpu_pod.sh --create --delete my-tpu us-central2-b \
      configs/celeba64.py /mnt/shared/runs/celeba64'
usage() { printf '%s\n' "$USAGE"; }
die() { echo "tpu_pod.sh: $*" >&2; usage >&2; exit 2; }

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

CREATE=0 DELETE=0 SETUP=1
while [[ $# -gt 0 && $1 == -* ]]; do
  case $1 in
    --dry-run) DRY_RUN=1 ;;
    --create) CREATE=1 ;;
    --delete) DELETE=1 ;;
    --skip-setup) SETUP=0 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option $1" ;;
  esac
  shift
done
[[ $# -ge 4 ]] || die "missing arguments: need TPU_NAME ZONE CONFIG WORKDIR"
TPU=$1 ZONE=$2 CONFIG=$3 WORKDIR=$4
shift 4
ROOT=$(cd "${BASH_SOURCE[0]%/*}/.." && pwd)
[[ $CONFIG == /* || -f $ROOT/${CONFIG%%:*} ]] || die "no config file ${CONFIG%%:*} in $ROOT"
[[ $CREATE == 0 || -n ${ACCELERATOR_TYPE:-} ]] || die "--create needs ACCELERATOR_TYPE (e.g. v4-32)"
REMOTE_DIR=${REMOTE_DIR:-dmz_jax}
PYTHON=${PYTHON:-python3}
FETCH_TO=${FETCH_TO:-runs/tpu-$TPU}

TPUVM=(gcloud compute tpus tpu-vm)
GC=(--zone="$ZONE")
if [[ -n ${PROJECT:-} ]]; then GC+=(--project="$PROJECT"); fi
on_all() { run "${TPUVM[@]}" ssh "$TPU" "${GC[@]}" --worker=all --command="$1"; }
R=$(quote "$REMOTE_DIR")

if [[ $CREATE == 1 ]]; then
  CREATE_ARGS=(--accelerator-type="$ACCELERATOR_TYPE" --version="${RUNTIME_VERSION:-tpu-ubuntu2204-base}")
  if [[ ${SPOT:-0} == 1 ]]; then CREATE_ARGS+=(--spot); fi
  run "${TPUVM[@]}" create "$TPU" "${GC[@]}" "${CREATE_ARGS[@]}"
fi

if [[ $SETUP == 1 ]]; then
  if [[ -n ${REPO_URL:-} ]]; then
    on_all "if [ -d $R/.git ]; then git -C $R pull --ff-only; else git clone $(quote "$REPO_URL") $R; fi"
  else
    TARBALL=${TMPDIR:-/tmp}/dmz_jax-$TPU.tar.gz
    run tar -czf "$TARBALL" --exclude=./.git --exclude=./.venv --exclude=./runs \
      --exclude=./.jax_cache --exclude=./.pytest_cache --exclude='*.egg-info' \
      --exclude=__pycache__ -C "$ROOT" .
    run "${TPUVM[@]}" scp "$TARBALL" "$TPU:dmz_jax.tar.gz" "${GC[@]}" --worker=all
    on_all "mkdir -p $R && tar -xzf dmz_jax.tar.gz -C $R"
  fi
  on_all "cd $R && $(line "$PYTHON" -m pip install -q -e . "${JAX_TPU:-jax[tpu]}")"
fi

on_all "cd $R && $(line "$PYTHON" -m dmz_jax.main --distributed --config="$CONFIG" --workdir="$WORKDIR" "$@")"

if [[ $WORKDIR == /* ]]; then SRC=$WORKDIR; else SRC=$REMOTE_DIR/$WORKDIR; fi
run mkdir -p "$FETCH_TO"
run "${TPUVM[@]}" scp --recurse "$TPU:$SRC" "$FETCH_TO" "${GC[@]}" --worker=0

if [[ $DELETE == 1 ]]; then run "${TPUVM[@]}" delete "$TPU" "${GC[@]}" --quiet; fi
