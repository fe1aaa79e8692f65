#!/usr/bin/env bash
# `connito train` over several machines with torchrun's c10d rendezvous. Run the same command on every node:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 RUN_ID=exp42 launch/torchrun_multi_node.sh run.name=exp42   # on node0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 RUN_ID=exp42 launch/torchrun_multi_node.sh run.name=exp42   # on node1
# Every node must see the same run directory (run.root on a shared filesystem) for checkpoints and resume; a run
# whose ranks see different checkpoint directories is refused.
#   NPROC          ranks per node (default: the GPUs, or 1 on a CPU-only machine)
#   MASTER_PORT    the rendezvous port on MASTER_ADDR (29500)
#   RUN_ID         the rendezvous id, the same on every node of one job (connito)
#   NODE_RANK      this node's number 0..NNODES-1 (node 0 runs on MASTER_ADDR). When set, the nodes first call
#                  the roll on MASTER_PORT+1, so a node that never comes is named: "node 1 never joined ...".
#                  (c10d itself gives the ranks out in join order and only says that the rendezvous timed out.)
#   JOIN_TIMEOUT   seconds to wait for all NNODES nodes to join before failing (600)
#   MAX_RESTARTS   restarts of the whole group after a rank dies (0); each restart resumes from the latest
#                  complete checkpoint (train.resume=auto)
# CONNITO_COMMAND=adapt (or analyze, ...) launches another connito command the same way (default: train).
set -euo pipefail
: "${NNODES:?set NNODES to the number of machines}"
: "${MASTER_ADDR:?set MASTER_ADDR to the host name of one of the machines}"
NPROC="${NPROC:-$(python3 -c 'import torch; print(torch.cuda.device_count() or 1)')}"
MASTER_PORT="${MASTER_PORT:-29500}"
JOIN_TIMEOUT="${JOIN_TIMEOUT:-600}"
if ! python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi
if [[ -n "${NODE_RANK:-}" ]]; then  # the roll call: every node says it is here, or the missing ones are named
  python3 "$(dirname "$0")/roll_call.py" --nodes "$NNODES" --node-rank "$NODE_RANK" --addr "$MASTER_ADDR" \
    --port $((MASTER_PORT + 1)) --timeout "$JOIN_TIMEOUT" --run-id "${RUN_ID:-connito}" --launcher torchrun_multi_node \
    --same "NNODES=$NNODES, MASTER_ADDR, MASTER_PORT and RUN_ID"
fi
# torchrun shares its rendezvous store across restarts without a per-attempt prefix: a restarted group could read
# the dead ranks' gloo addresses. A fresh store per restart avoids that.
if [[ "${MAX_RESTARTS:-0}" != 0 ]]; then export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1; fi
errors=$(mktemp)
trap 'rm -f "$errors"' EXIT
status=0
torchrun \
  --nnodes "$NNODES" --nproc_per_node "$NPROC" --node_rank "${NODE_RANK:-0}" \
  --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "${RUN_ID:-connito}" \
  --rdzv_conf "join_timeout=$JOIN_TIMEOUT" --max_restarts "${MAX_RESTARTS:-0}" \
  -m connito ${CONNITO_COMMAND:-train} "$@" 2> >(tee "$errors" >&2) || status=$?
wait  # the tee above
if [[ $status -ne 0 ]] && grep -q RendezvousTimeoutError "$errors"; then
  echo "torchrun_multi_node: node ${NODE_RANK:-?} ($(hostname)) waited ${JOIN_TIMEOUT}s at the rendezvous" \
    "$MASTER_ADDR:$MASTER_PORT (id ${RUN_ID:-connito}) and not all $NNODES nodes joined: a node that was never" \
    "started, or cannot reach $MASTER_ADDR:$MASTER_PORT, or runs with another RUN_ID/NNODES, is missing." \
    "Start the missing node(s) with the same NNODES, MASTER_ADDR, MASTER_PORT and RUN_ID," \
    "or raise JOIN_TIMEOUT." >&2
fi
exit $status
