#!/usr/bin/env bash
# N JAX processes on this host, each with its own fake CPU devices, joined through a localhost
# coordinator: the cheapest way to exercise the multi-host code paths without a pod.
# Usage: launch/local_multiprocess.sh NUM_PROCESSES DEVICES_PER_PROCESS -- <vlmu_jax.main args>
set -euo pipefail
if [[ $# -lt 3 || "$3" != "--" ]]; then
  echo "usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS -- --config configs/X.py --workdir DIR [...]" >&2
  exit 2
fi
nproc_jax=$1; ndev=$2; shift 3
port=${VLMU_COORDINATOR_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
python=${PYTHON:-python3}
pids=()
for ((i = 0; i < nproc_jax; i++)); do
  JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=${ndev}" \
    "$python" -m vlmu_jax.main "$@" \
    --coordinator_address="127.0.0.1:${port}" --num_processes="${nproc_jax}" --process_id="${i}" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
