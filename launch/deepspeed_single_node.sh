#!/usr/bin/env bash
# `connito train` under the deepspeed launcher on one machine.
#   NPROC=2 launch/deepspeed_single_node.sh engine=zero1
# CONNITO_COMMAND=adapt (or analyze, ...) launches another connito command the same way (default: train).
set -euo pipefail
NPROC="${NPROC:-$(python3 -c 'import torch; print(torch.cuda.device_count() or 2)')}"
if ! python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi
exec deepspeed --num_gpus "$NPROC" --no_local_rank --master_port "${MASTER_PORT:-29500}" --module connito ${CONNITO_COMMAND:-train} "$@"
