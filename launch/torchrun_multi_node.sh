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
  NNODES=$NNODES NODE_RANK=$NODE_RANK MASTER_ADDR=$MASTER_ADDR ROLL_PORT=$((MASTER_PORT + 1)) \
    JOIN_TIMEOUT=$JOIN_TIMEOUT RUN_ID="${RUN_ID:-connito}" TORCH_CPP_LOG_LEVEL=FATAL python3 - <<'PY'
import os, socket, sys, time
from datetime import timedelta
from torch.distributed import TCPStore

n, me, timeout = int(os.environ["NNODES"]), int(os.environ["NODE_RANK"]), float(os.environ["JOIN_TIMEOUT"])
where = f"{os.environ['MASTER_ADDR']}:{os.environ['ROLL_PORT']}"
prefix = f"connito/{os.environ['RUN_ID']}/"
try:
    store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["ROLL_PORT"]), is_master=me == 0,
                     timeout=timedelta(seconds=timeout), wait_for_workers=False)
except Exception as err:  # node 0 hosts the roll call: it is the one missing
    sys.exit(f"torchrun_multi_node: node 0 never joined the rendezvous: this node ({me}, {socket.gethostname()}) "
             f"could not reach {where} within {timeout:g}s (JOIN_TIMEOUT): start node 0 on MASTER_ADDR "
             f"({str(err).splitlines()[0]})")
store.set(f"{prefix}node{me}", socket.gethostname())
deadline = time.monotonic() + timeout
keys = [f"{prefix}node{i}" for i in range(n)]
while not store.check(keys) and time.monotonic() < deadline:
    time.sleep(0.2)
if not store.check(keys):
    missing = [str(i) for i in range(n) if not store.check([keys[i]])]
    here = [f"{i} ({store.get(keys[i]).decode()})" for i in range(n) if store.check([keys[i]])]
    sys.exit(f"torchrun_multi_node: node {', '.join(missing)} never joined the rendezvous at {where} within "
             f"{timeout:g}s (JOIN_TIMEOUT); joined: node {', '.join(here)}. Start the missing node(s) with "
             f"NODE_RANK set, the same NNODES={n}, MASTER_ADDR, MASTER_PORT and RUN_ID")
store.add(f"{prefix}done", 1)
if me == 0:  # keep the store up until every node has read the roll
    while store.add(f"{prefix}done", 0) < n and time.monotonic() < deadline + 30:
        time.sleep(0.2)
PY
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
