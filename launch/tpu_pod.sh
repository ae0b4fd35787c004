#!/usr/bin/env bash
# Train on a Cloud TPU VM or pod slice: create it (--create), copy this repository to every
# worker, install it with jax[tpu], run the same training command on all workers with
# --distributed (jax.distributed.initialize() finds the other workers from the TPU metadata),
# copy a local WORKDIR back from worker 0 (a gs:// WORKDIR stays where it is: the script prints
# it, and copies it with `gcloud storage cp` when FETCH_TO is set), delete the TPU (--delete).
# Run it from a terminal that stays open (tmux): training runs inside
# `gcloud ... ssh --worker=all`.
#
# Failures: the script stops at the first failing step and never deletes the TPU then; it
# prints the command that deletes it. Restarts: when training exits 75 (stopped by
# SIGTERM/SIGINT/SIGHUP after writing a checkpoint, e.g. a maintenance event) or 76 (a process
# of the job was lost), the same training command is run again, at most MAX_RESTARTS times; it
# resumes from the newest checkpoint.
#
# Shared storage: on a slice of more than one host every worker writes the same WORKDIR, so it
# must be storage that all of them see. Rule, checked before anything runs: WORKDIR is shared
# when it is gs://BUCKET/... or when SHARED_WORKDIR=1 says it is a mount on every worker
# (Filestore/NFS, gcsfuse). Any other WORKDIR (relative, or a local absolute path) needs a
# single-host slice: HOSTS=1, or an ACCELERATOR_TYPE of one host (v2-8, v3-8, v4-8, v5p-8,
# v5litepod-1/4/8, v6e-1/4/8); otherwise the script refuses. The data must be shared too
# (--config.data.data_dir=gs://...); configs/fashion_mnist.py reads the subset shipped in the
# package and needs no data.
#
# Needs here: gcloud, logged in (gcloud auth login), with a project (gcloud config set project P,
# or PROJECT=P) that has TPU quota in ZONE; tar (unless REPO_URL). On the workers: the TPU VM
# image's python3 with pip, and git if REPO_URL; for a gs:// WORKDIR, the TPU's service account
# may write to the bucket.
#
# Environment:
#   ACCELERATOR_TYPE  TPU type, needed with --create: v4-8, v4-32, v5litepod-16, v6e-8, ...;
#                     without --create it only tells the number of hosts (see Shared storage)
#   HOSTS             the slice's number of hosts, when ACCELERATOR_TYPE does not say it
#   SHARED_WORKDIR=1  WORKDIR is a folder that every worker sees (a shared mount)
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
#   FETCH_TO          local folder that receives WORKDIR (default runs/tpu-TPU_NAME; for a
#                     gs:// WORKDIR nothing is copied unless FETCH_TO is set)
#   MAX_RESTARTS      reruns of training after exit 75 or 76 (default 3; 0: never)
#   DRY_RUN=1         the same as --dry-run
set -euo pipefail

USAGE='Usage: launch/tpu_pod.sh [--dry-run] [--create] [--delete] [--skip-setup]
                         TPU_NAME ZONE CONFIG WORKDIR [FLAGS...]
  --dry-run     print every command, one per line, instead of running it (or DRY_RUN=1)
  --create      create the TPU VM first (needs ACCELERATOR_TYPE)
  --delete      delete the TPU VM at the end, only when every step succeeded
  --skip-setup  do not copy or install the code (done by an earlier call)
  CONFIG        a config of this repository, e.g. configs/celeba64.py or configs/cifar10.py:tiny
  WORKDIR       gs://BUCKET/PATH, or a path on the workers: on more than one host it must be
                gs:// or a shared mount (SHARED_WORKDIR=1)
  FLAGS         passed on to python -m dmz_jax.main, e.g. --config.training.batch_size=256
Example:
  ACCELERATOR_TYPE=v4-32 launch/tpu_pod.sh --create --delete my-tpu us-central2-b \
      configs/celeba64.py gs://my-bucket/runs/celeba64'
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
[[ ${MAX_RESTARTS:=3} =~ ^[0-9]+$ ]] || die "MAX_RESTARTS must be a number, not '$MAX_RESTARTS'"
[[ -z ${HOSTS:-} || $HOSTS =~ ^[1-9][0-9]*$ ]] || die "HOSTS must be a number, not '$HOSTS'"
REMOTE_DIR=${REMOTE_DIR:-dmz_jax}
PYTHON=${PYTHON:-python3}

hosts_of() {  # the number of hosts of an accelerator type like v4-32, or nothing if unknown
  local family=${1%-*} size=${1##*-}
  [[ $1 == *-* && $size =~ ^[1-9][0-9]*$ ]] || return 0
  case $family in
    v2|v3|v4|v5p) echo $(((size + 7) / 8)) ;;  # size counts TensorCores: 8 per host
    v5litepod|v5e|v6e) if ((size <= 8)); then echo 1; else echo $((size / 4)); fi ;;  # chips
  esac
}
is_shared() { [[ $WORKDIR == gs://* || ${SHARED_WORKDIR:-0} == 1 ]]; }
N_HOSTS=${HOSTS:-$(hosts_of "${ACCELERATOR_TYPE:-}")}
if ! is_shared && [[ $N_HOSTS != 1 ]]; then
  die "WORKDIR=$WORKDIR is not shared storage, and the slice has ${N_HOSTS:-an unknown number of} hosts: every host must write the same WORKDIR. Use gs://BUCKET/PATH, or a mount that every worker sees with SHARED_WORKDIR=1; for a single-host TPU say HOSTS=1 or ACCELERATOR_TYPE (e.g. v4-8)."
fi

TPUVM=(gcloud compute tpus tpu-vm)
GC=(--zone="$ZONE")
if [[ -n ${PROJECT:-} ]]; then GC+=(--project="$PROJECT"); fi
on_all() { run "${TPUVM[@]}" ssh "$TPU" "${GC[@]}" --worker=all --command="$1"; }
R=$(quote "$REMOTE_DIR")

kept_tpu_notice() {  # on a failed exit: the TPU is kept; how to delete it
  local rc=$?
  if [[ $rc != 0 ]]; then
    echo "tpu_pod.sh: stopped with exit status $rc; the TPU $TPU is kept. Delete it when done:" >&2
    echo "  $(line "${TPUVM[@]}" delete "$TPU" "${GC[@]}" --quiet)" >&2
  fi
}
trap kept_tpu_notice EXIT

EXIT_PREEMPTED=75  # dmz_jax.preemption.EXIT_PREEMPTED: stopped by a signal, checkpoint written
EXIT_PEER_LOST=76  # dmz_jax.preemption.EXIT_PEER_LOST: another process of the job was lost
train_with_restarts() {  # the training command on all workers; again after 75 or 76
  local attempt=0 rc
  while true; do
    rc=0
    on_all "$1" || rc=$?
    if [[ $rc != "$EXIT_PREEMPTED" && $rc != "$EXIT_PEER_LOST" ]]; then return "$rc"; fi
    if ((attempt >= MAX_RESTARTS)); then
      echo "tpu_pod.sh: training exited $rc after $attempt restart(s) (MAX_RESTARTS); rerun" \
        "with --skip-setup to resume from the last checkpoint" >&2
      return "$rc"
    fi
    attempt=$((attempt + 1))
    echo "tpu_pod.sh: training exited $rc; restart $attempt of $MAX_RESTARTS" >&2
  done
}

fetch_results() {  # a local WORKDIR: scp from worker 0; gs://: say where, copy if FETCH_TO
  if [[ $WORKDIR == gs://* ]]; then
    echo "tpu_pod.sh: the results are in $WORKDIR" >&2
    if [[ -n ${FETCH_TO:-} ]]; then
      run mkdir -p "$FETCH_TO"
      run gcloud storage cp --recursive "$WORKDIR" "$FETCH_TO"
    fi
    return
  fi
  local src dest=${FETCH_TO:-runs/tpu-$TPU}
  if [[ $WORKDIR == /* ]]; then src=$WORKDIR; else src=$REMOTE_DIR/$WORKDIR; fi
  run mkdir -p "$dest"
  run "${TPUVM[@]}" scp --recurse "$TPU:$src" "$dest" "${GC[@]}" --worker=0
}

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

train_with_restarts "cd $R && $(line "$PYTHON" -m dmz_jax.main --distributed --config="$CONFIG" --workdir="$WORKDIR" "$@")"
fetch_results
if [[ $DELETE == 1 ]]; then run "${TPUVM[@]}" delete "$TPU" "${GC[@]}" --quiet; fi
