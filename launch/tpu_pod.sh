#!/usr/bin/env bash
# Training on a Cloud TPU pod slice: the same command on every host.
#   launch/tpu_pod.sh my-tpu us-central2-b configs/celeba64.py /mnt/shared/runs/celeba64
# WORKDIR must be a filesystem path every host sees (NFS, Filestore, or a gcsfuse mount).
# Data must be readable from every host (tfds data_dir on GCS: --config.data.data_dir=gs://...).
set -euo pipefail
TPU=${1:?tpu name}; ZONE=${2:?zone}; CONFIG=${3:?config}; WORKDIR=${4:?workdir}
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command \
  "cd dmz_jax && python -m dmz_jax.main --distributed --config=$CONFIG --workdir=$WORKDIR ${*:5}"
