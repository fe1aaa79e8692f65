"""The roll call before a multi-node rendezvous: every node says it is here, or the missing ones are named.

torch's own rendezvous gives ranks out in join order and, when a node never comes, only says that it timed out
(c10d) or that "1/2 clients joined" (the deepspeed launcher). Here node 0 hosts a small TCPStore on ``--port``;
every node writes its name there and waits until all ``--nodes`` have, or until ``--timeout`` seconds, then fails
naming the missing node(s). Used by launch/torchrun_multi_node.sh and launch/deepspeed_multi_node.sh (per-node mode).
"""

import argparse
import socket
import sys
import time
from datetime import timedelta

from torch.distributed import TCPStore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--node-rank", type=int, required=True)
    parser.add_argument("--addr", required=True, help="node 0's address (MASTER_ADDR)")
    parser.add_argument("--port", type=int, required=True, help="the roll call's port on node 0 (MASTER_PORT + 1)")
    parser.add_argument("--timeout", type=float, required=True, help="seconds to wait (JOIN_TIMEOUT)")
    parser.add_argument("--run-id", default="connito")
    parser.add_argument("--launcher", default="roll_call", help="the script name the messages start with")
    parser.add_argument("--same", default="NNODES, MASTER_ADDR, MASTER_PORT and RUN_ID",
                        help="the settings every node must share, named in the message")  # fmt: skip
    args = parser.parse_args()
    n, me, timeout = args.nodes, args.node_rank, args.timeout
    if not 0 <= me < n:
        sys.exit(f"{args.launcher}: NODE_RANK={me} is not one of 0..{n - 1} ({n} nodes)")
    where = f"{args.addr}:{args.port}"
    prefix = f"connito/{args.run_id}/"
    try:
        store = TCPStore(args.addr, args.port, is_master=me == 0, timeout=timedelta(seconds=timeout),
                         wait_for_workers=False)  # fmt: skip
    except Exception as err:  # node 0 hosts the roll call: it is the one missing
        sys.exit(
            f"{args.launcher}: node 0 never joined the rendezvous: this node ({me}, {socket.gethostname()}) could not "
            f"reach {where} within {timeout:g}s (JOIN_TIMEOUT): start node 0 on MASTER_ADDR "
            f"({str(err).splitlines()[0]})"
        )
    store.set(f"{prefix}node{me}", socket.gethostname())
    deadline = time.monotonic() + timeout
    keys = [f"{prefix}node{i}" for i in range(n)]
    while not store.check(keys) and time.monotonic() < deadline:
        time.sleep(0.2)
    if not store.check(keys):
        missing = [str(i) for i in range(n) if not store.check([keys[i]])]
        here = [f"{i} ({store.get(keys[i]).decode()})" for i in range(n) if store.check([keys[i]])]
        sys.exit(
            f"{args.launcher}: node {', '.join(missing)} never joined the rendezvous at {where} within {timeout:g}s "
            f"(JOIN_TIMEOUT); joined: node {', '.join(here)}. Start the missing node(s) with NODE_RANK set and the "
            f"same {args.same}"
        )
    store.add(f"{prefix}done", 1)
    if me == 0:  # keep the store up until every node has read the roll
        while store.add(f"{prefix}done", 0) < n and time.monotonic() < deadline + 30:
            time.sleep(0.2)


if __name__ == "__main__":
    main()
