#!/usr/bin/env bash
# Train curriculax on a Cloud TPU VM slice: every host (worker) runs the same command and JAX
# finds its peers from the TPU metadata, so no --coordinator_address is needed.
#
#   export TPU_NAME=cx-v5e ZONE=us-west4-a ACCELERATOR=v5litepod-16 \
#          RUNTIME=v2-alpha-tpuv5-lite WORKDIR=gs://my-bucket/runs/gsm8k
#   scripts/tpu_vm_train.sh create            # allocate the slice
#   scripts/tpu_vm_train.sh setup             # copy this checkout to every worker, install
#   CONFIG=configs/gsm8k_sft.py scripts/tpu_vm_train.sh train --config.steps=2000
#   scripts/tpu_vm_train.sh logs              # tail worker 0's log
#   scripts/tpu_vm_train.sh stop | delete
#
# WORKDIR must be a location every worker sees (gs:// is the usual choice; checkpoints go
# there through Orbax). Metrics, TensorBoard events and plots are written on worker 0 under
# ~/curriculax/runs/gs/<bucket>/<path> (see docs/scale.md). Rerunning `train` with the same
# WORKDIR resumes from the latest checkpoint, e.g. after a preemption.
set -euo pipefail

cmd=${1:?usage: $0 create|setup|train|logs|stop|delete [curriculax flags]}
shift || true
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
ACCELERATOR=${ACCELERATOR:-v5litepod-16}
RUNTIME=${RUNTIME:-v2-alpha-tpuv5-lite}
REMOTE_DIR=${REMOTE_DIR:-curriculax}
CONFIG=${CONFIG:-configs/quickstart.py}
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}

tpu() { gcloud compute tpus tpu-vm "$@" --zone="$ZONE" $PROJECT_FLAG; }
on_all() { tpu ssh "$TPU_NAME" --worker=all --command="$1"; }

case "$cmd" in
  create)
    tpu create "$TPU_NAME" --accelerator-type="$ACCELERATOR" --version="$RUNTIME"
    ;;
  setup)
    archive=$(mktemp --suffix=.tar.gz)
    git -C "$(dirname "$0")/.." archive --format=tar.gz -o "$archive" HEAD
    tpu scp "$archive" "$TPU_NAME":curriculax.tar.gz --worker=all
    rm -f "$archive"
    on_all "set -e; mkdir -p $REMOTE_DIR && tar xzf curriculax.tar.gz -C $REMOTE_DIR && \
      cd $REMOTE_DIR && python3 -m venv .venv && .venv/bin/pip install -q -U pip && \
      .venv/bin/pip install -q -e . 'jax[tpu]' gcsfs"
    ;;
  train)
    : "${WORKDIR:?set WORKDIR=gs://bucket/path}"
    # nohup: the run survives a dropped ssh session; each worker logs to ~/REMOTE_DIR/train.log.
    flags=$(printf ' %q' "$@")
    on_all "cd $REMOTE_DIR && nohup .venv/bin/python -m curriculax.cli train \
      --config=$CONFIG --workdir=$WORKDIR $flags > train.log 2>&1 &"
    ;;
  logs)
    tpu ssh "$TPU_NAME" --worker=0 --command="tail -n 50 -f $REMOTE_DIR/train.log"
    ;;
  stop)  # SIGTERM: the hosts agree on a step, checkpoint it together and exit
    on_all "pkill -TERM -f 'curriculax.cli train' || true"
    ;;
  delete)
    tpu delete "$TPU_NAME" --quiet
    ;;
  *)
    echo "unknown command $cmd" >&2
    exit 2
    ;;
esac
