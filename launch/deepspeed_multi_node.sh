#!/usr/bin/env bash
# `connito train` under the deepspeed launcher over the machines of a hostfile. Two ways to start it:
#
# From one machine, which reaches every other one over pdsh/ssh (passwordless ssh to every host of the hostfile):
#   HOSTFILE=hostfile launch/deepspeed_multi_node.sh run.name=exp42
#
# On every node itself, with no ssh (deepspeed --no_ssh): run the same command on each machine, NODE_RANK set:
#   HOSTFILE=hostfile NODE_RANK=0 MASTER_ADDR=node0 launch/deepspeed_multi_node.sh run.name=exp42   # on node0
#   HOSTFILE=hostfile NODE_RANK=1 MASTER_ADDR=node0 launch/deepspeed_multi_node.sh run.name=exp42   # on node1
#
# hostfile lines look like `node0 slots=8`, the same file on every node. The run directory must be on a shared
# filesystem (run.root) for checkpoints and resume.
#   HOSTFILE       the deepspeed hostfile (required). Its order numbers the nodes and the ranks: the ranks of line
#                  i follow those of lines 0..i-1. With NODE_RANK the host names are only labels (never resolved
#                  nor contacted): this node starts the slots of line NODE_RANK.
#   NODE_RANK      per-node mode: this node's line of the hostfile, 0..nodes-1. Unset: the pdsh mode above.
#   MASTER_ADDR    per-node mode: the address of node 0 (the line-0 machine), reachable from every node (required
#                  with NODE_RANK; the pdsh mode ignores it and asks the first host: `ssh <host> hostname -I`)
#   MASTER_PORT    the torch.distributed port on MASTER_ADDR (29500)
#   JOIN_TIMEOUT   per-node mode: seconds to wait for every node of the hostfile at the roll call (on
#                  MASTER_PORT+1) before failing with the missing node named: "node 1 never joined ..." (600)
#   RUN_ID         per-node mode: the roll call's id, the same on every node of one job (connito)
#   DEEPSPEED_TIMEOUT  minutes the ranks then wait for each other in DeepSpeed's process-group rendezvous (10).
# In per-node mode the `deepspeed` runner does not pass SIGTERM on to its launcher (only the pdsh mode does):
# stop a node with Ctrl-C or by signalling its whole process group, not the runner's pid alone.
# CONNITO_COMMAND=adapt (or analyze, ...) launches another connito command the same way (default: train).
set -euo pipefail
: "${HOSTFILE:?set HOSTFILE to a deepspeed hostfile (lines: <host> slots=<gpus>)}"
if [[ -z "${NODE_RANK:-}" ]]; then  # pdsh mode: this machine starts every node
  exec deepspeed --hostfile "$HOSTFILE" --no_local_rank --master_port "${MASTER_PORT:-29500}" \
    --module connito ${CONNITO_COMMAND:-train} "$@"
fi
: "${MASTER_ADDR:?with NODE_RANK set (per-node mode), set MASTER_ADDR to the address of node 0 (the first host of HOSTFILE)}"
if [[ ! -f "$HOSTFILE" ]]; then  # deepspeed would quietly fall back to this machine alone
  echo "deepspeed_multi_node: HOSTFILE=$HOSTFILE is not a file" >&2
  exit 2
fi
if ! python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi
NNODES=$(grep -c -E '^[[:space:]]*[^#[:space:]]' "$HOSTFILE" || true)
MASTER_PORT="${MASTER_PORT:-29500}"
python3 "$(dirname "$0")/roll_call.py" --nodes "$NNODES" --node-rank "$NODE_RANK" --addr "$MASTER_ADDR" \
  --port $((MASTER_PORT + 1)) --timeout "${JOIN_TIMEOUT:-600}" --run-id "${RUN_ID:-connito}" \
  --launcher deepspeed_multi_node --same "HOSTFILE ($NNODES nodes), MASTER_ADDR, MASTER_PORT and RUN_ID"
exec deepspeed --hostfile "$HOSTFILE" --no_ssh --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" \
  --no_local_rank --master_port "$MASTER_PORT" --module connito ${CONNITO_COMMAND:-train} "$@"
