"""Multi-node launch, tried on one machine as two nodes: two `launch/torchrun_multi_node.sh` processes (c10d
rendezvous on localhost, one rank each) train exactly what one node with two ranks trains (the loss curve, the final
weights and optimizer state, bit for bit), also with expert parallelism across the two nodes; a node that never
joins is named when the other gives up."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, assert_same_final_state, clean_env, free_port, small_overrides


def script_env(**extra: str) -> dict[str, str]:
    """The launch scripts call `torchrun` and `python3`: this interpreter's first on PATH."""
    bindir = str(Path(sys.executable).parent)
    return clean_env(PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONPATH=str(REPO), **extra)


def curve(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "train/tokens_per_s"} for r in records if "train/loss" in r]


def two_nodes(args: list[str], cwd: Path, timeout: float = 300, **extra: str) -> list[subprocess.CompletedProcess]:
    port = free_port()
    procs = [
        subprocess.Popen(
            [str(REPO / "launch" / "torchrun_multi_node.sh"), *args],
            cwd=cwd,
            env=script_env(
                NNODES="2",
                NODE_RANK=str(node),
                NPROC="1",
                MASTER_ADDR="localhost",
                MASTER_PORT=str(port),
                RUN_ID=f"test{port}",
                JOIN_TIMEOUT="120",
                **extra,
            ),  # fmt: skip
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in (0, 1)
    ]
    deadline = time.monotonic() + timeout
    outs = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        outs.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return outs


def one_node_reference(data_cache: Path, root: Path, ep_size: int) -> tuple[list[str], Path]:
    """The overrides of a 4-step run at ``ep_size`` (run.root and run.name left to the caller), and the run directory
    of what one node with two ranks trains with them (``<root>/runs/one``). The tests take it from the session's
    ``one_node`` fixture (tests/conftest.py): one run per ep_size serves both launchers' tests."""
    args = small_overrides(data_cache) + ["train.steps=4", "train.eval_every=0", "train.export=false",
                                          f"parallel.ep_size={ep_size}"]  # fmt: skip
    one = subprocess.run(
        [str(REPO / "launch" / "torchrun_single_node.sh"), "run.name=one", f"run.root={root / 'runs'}", *args],
        cwd=root, env=script_env(NPROC="2"), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-4000:]
    assert len(curve(root / "runs" / "one")) == 4
    return args, root / "runs" / "one"


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("ep_size", [1, 2])
def test_two_nodes_train_what_one_node_trains(one_node, tmp_path, ep_size):
    args, one = one_node(ep_size)
    nodes = two_nodes(["run.name=two", f"run.root={tmp_path / 'runs'}", *args], tmp_path)
    for node in nodes:
        assert node.returncode == 0, node.stderr[-4000:]
    assert curve(tmp_path / "runs" / "two") == curve(one)  # bit for bit: same rows, same reductions
    assert_same_final_state(one, tmp_path / "runs" / "two")


def lone_node(script: str, cwd: Path, present: int, **env: str) -> subprocess.CompletedProcess:
    """Node ``present`` of two, started alone on localhost with a 3 s JOIN_TIMEOUT: it must give up."""
    return subprocess.run(
        [str(REPO / "launch" / script), "train"],
        cwd=cwd,
        env=script_env(
            NODE_RANK=str(present), MASTER_ADDR="localhost", MASTER_PORT=str(free_port()), JOIN_TIMEOUT="3", **env
        ),  # fmt: skip
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("present", [0, 1])
def test_a_node_that_never_joins_is_named(tmp_path, present):
    """Only node `present` starts; it gives up after JOIN_TIMEOUT naming the other node."""
    proc = lone_node("torchrun_multi_node.sh", tmp_path, present, NNODES="2", NPROC="1")
    assert proc.returncode != 0
    assert f"node {1 - present} never joined the rendezvous" in proc.stderr, proc.stderr[-3000:]
    assert "JOIN_TIMEOUT" in proc.stderr
