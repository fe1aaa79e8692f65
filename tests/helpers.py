"""Shared test helpers: small configs composed from the real YAML files, clean subprocess environments, and the
bit-for-bit comparison of two runs' final weights and optimizer state."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import load_file

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


# -- final weights and optimizer state, bit for bit ---------------------------------------------------------------


def final_checkpoint(run_dir: Path) -> Path:
    """The checkpoint ``<run_dir>/checkpoints/latest`` names."""
    root = Path(run_dir) / "checkpoints"
    return root / (root / "latest").read_text().strip()


def _leaves(value, name: str, out: dict) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _leaves(item, f"{name}{'' if name.endswith(':') else '.'}{key}", out)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _leaves(item, f"{name}[{index}]", out)
    else:
        out[name] = value


def checkpoint_contents(checkpoint: Path) -> dict[str, object]:
    """Every leaf of a training checkpoint, read as plain files (no Connito reader): each ``*.pt`` file DeepSpeed
    and Connito wrote in it (module weights, the torch or ZeRO optimizer state of every rank and expert-parallel
    rank, the LR scheduler, the engine's counters, the callbacks' state) and ``connito_state.json``, named
    ``<file>:<key>.<key>[<index>]``. Derived folders (``universal/``, ``relayout-*``) are left out."""
    leaves: dict[str, object] = {}
    for path in sorted(Path(checkpoint).glob("*.pt")):
        _leaves(torch.load(path, map_location="cpu", weights_only=False), f"{path.name}:", leaves)
    _leaves(json.loads((Path(checkpoint) / "connito_state.json").read_text()), "connito_state.json:", leaves)
    return leaves


_SAME_SIZE_INT = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
                  torch.bfloat16: torch.int16}  # fmt: skip


def _bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s elements as integers of the same width: equal exactly where the bits are (-0.0 is not 0.0)."""
    return t.contiguous().view(_SAME_SIZE_INT[t.dtype]) if t.dtype in _SAME_SIZE_INT else t


def _difference(a: torch.Tensor, b: torch.Tensor) -> str | None:
    """None where ``a`` and ``b`` are the same bits (shape, dtype, every element), else how they differ."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return f"{tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}"
    differ = _bits(a) != _bits(b)
    if not differ.any():
        return None
    first = tuple(int(i) for i in differ.nonzero()[0])
    gap = (a.double() - b.double()).abs()[differ].max().item()
    return (f"{int(differ.sum())} of {a.numel()} elements differ, max |a - b| = {gap:.3g}, first at index {first}: "
            f"{a[first].item()!r} vs {b[first].item()!r}")  # fmt: skip


def assert_same_bits(a: dict, b: dict, what: str) -> int:
    """``a`` and ``b`` (name -> tensor or plain value) hold the same names and, under each, the same tensor bit for
    bit (shape, dtype and every element's bits: stricter than ``torch.equal``, which takes -0.0 for 0.0) or the same
    plain value. The message names the first name that differs and how, and the next few that differ. Returns how
    many tensors were compared (at least one)."""
    if a.keys() != b.keys():
        only_a, only_b = sorted(a.keys() - b.keys()), sorted(b.keys() - a.keys())
        raise AssertionError(f"{what}: names differ; only in the first: {only_a[:8]} ({len(only_a)}), only in the "
                             f"second: {only_b[:8]} ({len(only_b)})")  # fmt: skip
    differing, tensors = [], 0
    for name, x in a.items():
        y = b[name]
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            tensors += 1
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
                differing.append((name, f"{type(x).__name__} vs {type(y).__name__}"))
            elif (difference := _difference(x, y)) is not None:
                differing.append((name, difference))
        elif x != y and not (x != x and y != y):  # plain values; NaN equals NaN
            differing.append((name, f"{x!r} vs {y!r}"))
    if differing:
        (first, how), rest = differing[0], [name for name, _ in differing[1:6]]
        raise AssertionError(f"{what}: {len(differing)} of {len(a)} entries differ; the first is {first}: {how}"
                             + (f"; then {', '.join(rest)}" if rest else ""))  # fmt: skip
    assert tensors, f"{what}: no tensor to compare"
    return tensors


def exported_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The HF export's tensors (``<run_dir>/hf/*.safetensors``), by name."""
    files = sorted((Path(run_dir) / "hf").glob("*.safetensors"))
    assert files, f"{run_dir}/hf holds no safetensors export"
    return {name: tensor for path in files for name, tensor in load_file(path).items()}


def assert_same_final_state(run_a: Path, run_b: Path) -> None:
    """Two runs end on the same step with the same model weights and optimizer state, bit for bit: every leaf of
    their final checkpoints (:func:`checkpoint_contents`) and, where both exported, every tensor of the HF export."""
    a, b = final_checkpoint(run_a), final_checkpoint(run_b)
    assert a.name == b.name, f"the runs end on different checkpoints: {a} vs {b}"
    contents = checkpoint_contents(a)
    assert any(":optimizer" in n or "optim_states" in n for n in contents), f"{a} holds no optimizer state"
    assert_same_bits(contents, checkpoint_contents(b), f"final checkpoints {a} vs {b}")
    if (Path(run_a) / "hf").is_dir() or (Path(run_b) / "hf").is_dir():
        assert_same_bits(exported_weights(run_a), exported_weights(run_b), f"HF exports of {run_a} vs {run_b}")
