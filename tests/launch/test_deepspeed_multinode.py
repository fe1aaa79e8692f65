"""The deepspeed launcher over several machines, tried on one machine as two nodes: two
`launch/deepspeed_multi_node.sh` processes in per-node mode (`deepspeed --no_ssh --node_rank N`, a two-host
hostfile whose names are never resolved, one slot each) train exactly what one node with two ranks trains (the loss
curve, the final weights and optimizer state, bit for bit), also with expert parallelism across the two nodes; the
required variables are asked for by name."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, assert_same_final_state, free_port
from tests.launch.test_multinode import curve, lone_node, script_env

SCRIPT = str(REPO / "launch" / "deepspeed_multi_node.sh")


def two_nodes(args: list[str], cwd: Path, timeout: float = 300) -> list[subprocess.CompletedProcess]:
    hostfile = cwd / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")  # labels only: --no_ssh never resolves them
    port = free_port()
    procs = [
        subprocess.Popen(
            [SCRIPT, *args],
            cwd=cwd,
            env=script_env(
                HOSTFILE=str(hostfile),
                NODE_RANK=str(node),
                MASTER_ADDR="localhost",
                MASTER_PORT=str(port),
                DEEPSPEED_TIMEOUT="2",  # minutes: a node that does not come fails the test, not the session
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # the runner does not pass a signal on to its launcher: stop the whole group
        )
        for node in (0, 1)
    ]
    deadline = time.monotonic() + timeout
    outs = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outs.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(30)
    return outs


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("ep_size", [1, 2])
def test_two_deepspeed_nodes_train_what_one_node_trains(one_node, tmp_path, ep_size):
    args, one = one_node(ep_size)
    nodes = two_nodes(["run.name=two", f"run.root={tmp_path / 'runs'}", *args], tmp_path)
    for node in nodes:
        assert node.returncode == 0, node.stderr[-4000:]
    assert "--node_rank=1" in nodes[1].stderr + nodes[1].stdout  # the per-node mode's local launch, not pdsh
    assert curve(tmp_path / "runs" / "two") == curve(one)  # bit for bit: same rows, same reductions
    assert_same_final_state(one, tmp_path / "runs" / "two")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "set HOSTFILE to a deepspeed hostfile"),
        ({"HOSTFILE": "hostfile", "NODE_RANK": "1"}, "with NODE_RANK set (per-node mode), set MASTER_ADDR"),
        ({"HOSTFILE": "missing", "NODE_RANK": "0", "MASTER_ADDR": "localhost"}, "HOSTFILE=missing is not a file"),
    ],
    ids=["no-hostfile", "no-master-addr", "hostfile-not-a-file"],
)
def test_a_missing_setting_is_named(tmp_path, env, message):
    """Fails before deepspeed starts, naming what is missing."""
    (tmp_path / "hostfile").write_text("node0 slots=1\nnode1 slots=1\n")
    child_env = {k: v for k, v in script_env(**env).items() if k in env or k not in ("HOSTFILE", "NODE_RANK")}
    proc = subprocess.run([SCRIPT, "train"], cwd=tmp_path, env=child_env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize("present", [0, 1])
def test_a_node_that_never_joins_is_named(tmp_path, present):
    """Only node `present` of a two-host hostfile starts; the roll call gives up after JOIN_TIMEOUT naming the
    other node, before deepspeed starts (whose own rendezvous would only say "1/2 clients joined")."""
    (tmp_path / "hostfile").write_text("# two machines\nnode0 slots=1\n\nnode1 slots=1\n")
    proc = lone_node("deepspeed_multi_node.sh", tmp_path, present, HOSTFILE="hostfile")
    assert proc.returncode != 0
    assert f"deepspeed_multi_node: node {1 - present} never joined the rendezvous" in proc.stderr, proc.stderr[-3000:]
    assert "HOSTFILE (2 nodes)" in proc.stderr or present == 1  # node 0 absent: the message says to start it
    assert "JOIN_TIMEOUT" in proc.stderr
