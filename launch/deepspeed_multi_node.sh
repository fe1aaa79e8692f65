#!/usr/bin/env bash
# `connito train` under the deepspeed launcher over the machines of a hostfile (pdsh/ssh to each).
#   HOSTFILE=hostfile launch/deepspeed_multi_node.sh run.name=exp42
# hostfile lines look like `node0 slots=8`. The run directory must be on a shared filesystem.
# CONNITO_COMMAND=adapt (or analyze, ...) launches another connito command the same way (default: train).
set -euo pipefail
: "${HOSTFILE:?set HOSTFILE to a deepspeed hostfile (lines: <host> slots=<gpus>)}"
exec deepspeed --hostfile "$HOSTFILE" --no_local_rank --master_port "${MASTER_PORT:-29500}" --module connito ${CONNITO_COMMAND:-train} "$@"
