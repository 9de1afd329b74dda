#!/usr/bin/env bash
# N jaxalign processes on this machine, joined with CPU (gloo) collectives: the multi-host rehearsal that
# CI runs. Each process sees DEVICES simulated CPU devices; output lines are prefixed with the process id.
#
#   launch/local_multiprocess.sh N DEVICES jaxalign train --config configs/sft.py --config.run_dir=runs/x
set -uo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS COMMAND..." >&2
  exit 2
fi
N=$1; D=$2; shift 2
PORT=${JAXALIGN_PORT:-$((20000 + RANDOM % 20000))}
pids=()
for ((i = 0; i < N; i++)); do
  JAXALIGN_COORDINATOR_ADDRESS=127.0.0.1:$PORT JAXALIGN_NUM_PROCESSES=$N JAXALIGN_PROCESS_ID=$i \
    JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$D" \
    "$@" > >(sed -u "s/^/[$i] /") 2>&1 &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do
  wait "$p" || rc=$?
done
exit $rc
