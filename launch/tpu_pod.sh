#!/usr/bin/env bash
# TPU pod slice: create (or reuse) a TPU VM slice, install jaxalign on every worker, run the same
# `jaxalign train` on all of them (JAX auto-detects the slice), and copy each worker's log back.
#
#   TPU_NAME=align-v5p ZONE=us-east5-a ACCELERATOR=v5p-64 launch/tpu_pod.sh \
#       --config configs/llama3_8b_sft.py --config.mesh.shape="(1,32,1)" --config.model.path=/mnt/llama3-8b
#
# Data, model and run_dir paths must be visible to every worker (a GCS fuse mount or a shared disk).
set -euo pipefail
TPU_NAME=${TPU_NAME:?set TPU_NAME}
ZONE=${ZONE:?set ZONE}
ACCELERATOR=${ACCELERATOR:-v5p-64}
VERSION=${VERSION:-v2-alpha-tpuv5}
REPO=${REPO:-https://github.com/your-org/jaxalign.git}   # or set SOURCE_DIR to copy a local checkout
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}

if ! gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone "$ZONE" $PROJECT_FLAG > /dev/null 2>&1; then
  gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" --accelerator-type "$ACCELERATOR" \
    --version "$VERSION" $PROJECT_FLAG
fi

ssh_all() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" $PROJECT_FLAG --worker=all --command "$1"
}

if [ -n "${SOURCE_DIR:-}" ]; then
  gcloud compute tpus tpu-vm scp --recurse "$SOURCE_DIR" "$TPU_NAME":~/jaxalign --zone "$ZONE" \
    $PROJECT_FLAG --worker=all
else
  ssh_all "test -d ~/jaxalign || git clone $REPO ~/jaxalign"
fi
ssh_all "cd ~/jaxalign && pip install -q -e . 'jax[tpu]'"

ARGS=$(printf ' %q' "$@")
ssh_all "cd ~/jaxalign && JAX_PLATFORMS=tpu jaxalign train$ARGS > ~/jaxalign-train.log 2>&1; echo exit \$?"

mkdir -p "logs/$TPU_NAME"
gcloud compute tpus tpu-vm scp "$TPU_NAME":~/jaxalign-train.log "logs/$TPU_NAME/" --zone "$ZONE" \
  $PROJECT_FLAG --worker=all || true
echo "logs in logs/$TPU_NAME/"
