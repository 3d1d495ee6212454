#!/usr/bin/env bash
# Runs the same vlmu_jax command on every worker of a Cloud TPU VM pod slice; JAX discovers the
# pod topology itself. The workdir should be a bucket (gs://...) or a shared filesystem so Orbax
# checkpoints and results are visible to every host.
#
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a launch/tpu_pod.sh setup            # install on all workers
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a launch/tpu_pod.sh run --config configs/fiubench_llava15.py:npo --workdir gs://b/run1
#   TPU_NAME=... ZONE=... ACCELERATOR=v5p-64 VERSION=v2-alpha-tpuv5 launch/tpu_pod.sh create
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
repo_url=${REPO_URL:-}
remote_dir=${REMOTE_DIR:-vlmu_jax}
ssh_all() { gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$1"; }
case "${1:-}" in
  create)
    gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" \
      --accelerator-type "${ACCELERATOR:?set ACCELERATOR}" --version "${VERSION:?set VERSION}" ;;
  setup)
    [[ -n "$repo_url" ]] || { echo "set REPO_URL to a clone URL reachable from the workers" >&2; exit 2; }
    ssh_all "git clone $repo_url $remote_dir 2>/dev/null || git -C $remote_dir pull; \
      cd $remote_dir && python3 -m pip install -q -e . 'jax[tpu]'" ;;
  run)
    shift
    args=$(printf ' %q' "$@")
    ssh_all "cd $remote_dir && python3 -m vlmu_jax.main$args" ;;
  delete)
    gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone "$ZONE" --quiet ;;
  *)
    echo "usage: $0 create|setup|run ARGS...|delete" >&2; exit 2 ;;
esac
