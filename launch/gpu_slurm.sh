#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one process per node driving all its GPUs (the default), or one
# process per GPU (GPUS_PER_TASK=1). JAX finds the coordinator, process count and ids from SLURM itself
# (jax.distributed auto-detection), so every task runs the same `jaxalign train` command.
#
#   sbatch --nodes=2 launch/gpu_slurm.sh --config configs/llama3_8b_sft.py --config.model.path=/shared/llama3-8b
#
#SBATCH --job-name=jaxalign
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --exclusive
#SBATCH --output=jaxalign-%j.log
set -euo pipefail

GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-8}
GPUS_PER_TASK=${GPUS_PER_TASK:-$GPUS_PER_NODE}      # 1 = one process per GPU (then use --ntasks-per-node=8)
export JAX_PLATFORMS=cuda
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
# NCCL: InfiniBand when present; set NCCL_SOCKET_IFNAME to the node's fast interface when it is not eth0/ib0.
export NCCL_IB_DISABLE=${NCCL_IB_DISABLE:-0}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"

srun --kill-on-bad-exit=1 bash -c '
  if [ "'"$GPUS_PER_TASK"'" != "'"$GPUS_PER_NODE"'" ]; then
    export CUDA_VISIBLE_DEVICES=$SLURM_LOCALID
  fi
  exec jaxalign train "$@"
' jaxalign "$@"
