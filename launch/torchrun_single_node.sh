#!/usr/bin/env bash
# Data-parallel `connito train` on one machine with torchrun.
#   NPROC=2 launch/torchrun_single_node.sh engine=zero2 train.steps=1000
# NPROC defaults to the number of GPUs, or 2 on a CPU-only machine (gloo; one thread per rank).
# CONNITO_COMMAND=adapt (or analyze, ...) launches another connito command the same way (default: train).
set -euo pipefail
if [[ -z "${NPROC:-}" ]]; then
  NPROC=$(python3 -c 'import torch; print(torch.cuda.device_count() or 2)')
fi
if ! python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi
exec torchrun --standalone --nproc_per_node "$NPROC" -m connito ${CONNITO_COMMAND:-train} "$@"
