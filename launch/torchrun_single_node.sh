#!/usr/bin/env bash
# Data-parallel `connito train` on one machine with torchrun.
#   NPROC=2 launch/torchrun_single_node.sh engine=zero2 train.steps=1000
# NPROC defaults to the number of GPUs, or 2 on a CPU-only machine (gloo; one thread per rank).
# MAX_RESTARTS=1 restarts the ranks once if one dies; the restarted run resumes from the latest complete
# checkpoint (train.resume=auto, the default).
# CONNITO_COMMAND=adapt (or analyze, ...) launches another connito command the same way (default: train).
set -euo pipefail
if [[ -z "${NPROC:-}" ]]; then
  NPROC=$(python3 -c 'import torch; print(torch.cuda.device_count() or 2)')
fi
if ! python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi
# torchrun shares its rendezvous store across restarts without a per-attempt prefix: a restarted group could read
# the dead ranks' gloo addresses. A fresh store per restart avoids that.
if [[ "${MAX_RESTARTS:-0}" != 0 ]]; then export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1; fi
exec torchrun --standalone --nproc_per_node "$NPROC" --max_restarts "${MAX_RESTARTS:-0}" -m connito ${CONNITO_COMMAND:-train} "$@"
