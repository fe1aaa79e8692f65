"""A SLURM cluster for tests that submit real ``sbatch`` jobs (job arrays, ``--dependency``).

Not a test file: import the fixture where it is used (``from tests.orchestration.slurm_cluster import
slurm_cluster``) or from a conftest. The fixture never starts a cluster; CI starts one with
``launch/slurm/local_cluster.sh up`` (root, Debian) before pytest. Without one the tests skip, or fail under
``CI=true`` (:func:`tests.infra.require`).
"""

from __future__ import annotations

import functools
import shutil
import subprocess
from dataclasses import dataclass

import pytest

from tests.infra import require

SKIP_REASON = "no SLURM cluster: run launch/slurm/local_cluster.sh up (root, Debian)"
USABLE_STATES = ("idle", "mix", "alloc", "completing")  # sinfo %T prefixes of nodes that take jobs


@dataclass(frozen=True)
class SlurmCluster:
    """What ``sinfo`` reported: the default partition, its nodes and their CPUs in all."""

    partition: str
    nodes: tuple[str, ...]
    cpus: int


@functools.lru_cache(maxsize=1)
def _probe(timeout: float = 10.0) -> SlurmCluster | str:
    """The cluster, or why there is none. Cached: against a stopped controller sinfo takes ~9 s to give up."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return SKIP_REASON + " (sbatch/sinfo not on PATH)"
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%P|%N|%c|%T"], capture_output=True, text=True, timeout=timeout
        )
    except (OSError, subprocess.TimeoutExpired):
        return SKIP_REASON + f" (sinfo did not answer within {timeout:.0f}s)"
    if out.returncode != 0:
        said = out.stderr.strip().splitlines()
        return SKIP_REASON + f" (sinfo: {said[-1] if said else f'exit {out.returncode}'})"
    rows = [line.split("|") for line in out.stdout.splitlines() if line.count("|") == 3]
    usable = [r for r in rows if r[3].lower().startswith(USABLE_STATES)]
    default = [r for r in usable if r[0].endswith("*")] or usable
    if not default:
        states = ", ".join(sorted({f"{r[1]}={r[3]}" for r in rows})) or "no nodes"
        return f"SLURM answers but no node takes jobs ({states}); try launch/slurm/local_cluster.sh up"
    partition = default[0][0].rstrip("*")
    mine = [r for r in default if r[0].rstrip("*") == partition]
    return SlurmCluster(partition, tuple(r[1] for r in mine), sum(int(r[2]) for r in mine if r[2].isdigit()))


def slurm_available() -> bool:
    """``sbatch`` is on PATH and ``sinfo`` answers within 10 s with a node that takes jobs."""
    return isinstance(_probe(), SlurmCluster)


@pytest.fixture(scope="session")
def slurm_cluster() -> SlurmCluster:
    """The running SLURM cluster; without one the test skips, or fails under CI=true (it never starts one)."""
    found = _probe()
    require(None if isinstance(found, SlurmCluster) else found)
    return found
