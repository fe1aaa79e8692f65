"""Process-group set-up for every launcher: one plain process, torchrun, the deepspeed launcher, SLURM.

Must run before ``deepspeed`` is imported anywhere: DeepSpeed picks its accelerator at import time, so on a
machine without CUDA we select ``DS_ACCELERATOR=cpu`` (gloo) here.
"""

import logging
import os
import socket
from dataclasses import dataclass

log = logging.getLogger("connito.training")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    backend: str
    accelerator: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _fill_env_for_launcher() -> None:
    """torchrun and the deepspeed launcher set RANK/WORLD_SIZE; SLURM sets SLURM_*; a plain process sets nothing."""
    if "RANK" in os.environ:
        return
    if "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
        if "MASTER_ADDR" not in os.environ:
            raise RuntimeError(
                "running under SLURM with several tasks but MASTER_ADDR is not set: launch with "
                "launch/slurm.sbatch, which exports MASTER_ADDR and MASTER_PORT"
            )
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


def select_accelerator() -> str:
    """Set DS_ACCELERATOR=cpu when there is no CUDA device (unless the user chose one) and return its name."""
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        os.environ["DS_ACCELERATOR"] = "cuda" if torch.cuda.is_available() else "cpu"
    return os.environ["DS_ACCELERATOR"]


def init_distributed(backend: str = "auto") -> DistInfo:
    """Initialise torch.distributed through DeepSpeed (idempotent) and return this process's place in it."""
    accelerator = select_accelerator()
    _fill_env_for_launcher()
    if backend == "auto":
        backend = "nccl" if accelerator == "cuda" else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"engine.backend='{backend}' is not one of auto, gloo, nccl")
    if backend == "nccl" and accelerator != "cuda":
        raise ValueError("engine.backend=nccl needs CUDA devices; use engine.backend=auto (gloo on CPU)")

    import deepspeed
    import torch

    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if accelerator == "cuda":
        torch.cuda.set_device(local_rank)
    info = DistInfo(
        rank=torch.distributed.get_rank(),
        world_size=torch.distributed.get_world_size(),
        local_rank=local_rank,
        backend=backend,
        accelerator=accelerator,
    )
    if info.is_main:
        log.info("distributed: world %d, backend %s, accelerator %s", info.world_size, backend, accelerator)
    else:  # one voice: the other ranks only report warnings and errors
        logging.getLogger("connito").setLevel(logging.WARNING)
    return info
