#!/usr/bin/env bash
# Multi-node GPU training with Open MPI (no scheduler): one process per node, all its GPUs. JAX reads the
# rank and size from Open MPI (OMPI_COMM_WORLD_*) and the first host in HOSTS coordinates.
#
#   HOSTS=node1,node2 launch/gpu_mpirun.sh --config configs/llama3_8b_dpo.py --config.model.path=/shared/sft
set -euo pipefail
HOSTS=${HOSTS:?set HOSTS=node1,node2,...}
N=$(echo "$HOSTS" | tr ',' '\n' | grep -c .)
FIRST=$(echo "$HOSTS" | cut -d, -f1)
PORT=${JAXALIGN_PORT:-12355}

mpirun -np "$N" -H "$HOSTS" --map-by ppr:1:node --bind-to none \
  -x JAX_PLATFORMS=cuda -x NCCL_DEBUG=${NCCL_DEBUG:-WARN} -x PATH -x LD_LIBRARY_PATH \
  -x JAXALIGN_COORDINATOR_ADDRESS="$FIRST:$PORT" -x JAXALIGN_NUM_PROCESSES="$N" \
  bash -c 'JAXALIGN_PROCESS_ID=$OMPI_COMM_WORLD_RANK exec jaxalign train "$@"' jaxalign "$@"
