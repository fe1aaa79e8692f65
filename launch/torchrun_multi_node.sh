#!/usr/bin/env bash
# `connito train` over several machines with torchrun's c10d rendezvous. Run the same command on every node:
#   NNODES=2 NPROC=8 MASTER_ADDR=node0 MASTER_PORT=29500 RUN_ID=exp42 launch/torchrun_multi_node.sh run.name=exp42
# Every node must see the same run directory (run.root on a shared filesystem) for checkpoints and resume.
# CONNITO_COMMAND=adapt (or analyze, ...) launches another connito command the same way (default: train).
set -euo pipefail
: "${NNODES:?set NNODES to the number of machines}"
: "${MASTER_ADDR:?set MASTER_ADDR to the host name of one of the machines}"
NPROC="${NPROC:-$(python3 -c 'import torch; print(torch.cuda.device_count() or 1)')}"
exec torchrun \
  --nnodes "$NNODES" --nproc_per_node "$NPROC" \
  --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv_id "${RUN_ID:-connito}" \
  -m connito ${CONNITO_COMMAND:-train} "$@"
