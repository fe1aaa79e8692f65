"""Shared test helpers: small configs composed from the real YAML files, and clean subprocess environments."""

import os
import socket
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from connito.cli import schema  # noqa: F401  (registers the typed configs)
from connito.cli.paths import config_dir

REPO = Path(__file__).resolve().parents[1]
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")


def small_overrides(cache_dir: Path) -> list[str]:
    """A run that takes seconds: small data, vocab 512, rows of 64 tokens, no wandb, no progress bar, no analysis
    report after training."""
    return [
        f"data.cache_dir={cache_dir}",
        "data.max_chars_per_domain=120000",
        "data.vocab_size=512",
        "data.seq_len=64",
        "train.micro_batch_size=4",
        "train.log_every=1",
        "train.eval_batches=2",
        "logging.wandb=false",
        "logging.progress=false",
        "analysis=none",
    ]


def compose_train(overrides: list[str]):
    """The typed root config exactly as `connito train <overrides>` would build it."""
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    return OmegaConf.to_object(cfg)


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for a child launcher: no rank variables left over from an in-process group."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV and k != "CONNITO_CACHE"}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1", **extra)
    return env


def run_cli(args: list[str], cwd: Path, timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "connito", *args],
        cwd=cwd,
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(nproc: int, script: Path, args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``script`` on ``nproc`` gloo ranks under torchrun (a free port, no rank variables inherited)."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--master_port", str(free_port()), str(script), *args,
    ]  # fmt: skip
    return subprocess.run(command, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=timeout)
