"""``connito apply base=<checkpoint> delta=<package> out=<dir>``: base + expert delta as a full HF checkpoint."""

from dataclasses import dataclass
from pathlib import Path

from connito.cli.command import Command


@dataclass
class ApplyConfig:
    """Root config of ``connito apply`` (:func:`connito.experts.delta.apply_delta`). Kept here, not beside
    ``apply_delta``: importing ``connito.experts`` loads torch, and ``connito --help`` reads every command's config."""

    base: str = ""
    """The ``save_pretrained`` checkpoint the delta was trained from (required)."""
    delta: str = ""
    """The delta package: a directory with manifest.json and safetensors files (required)."""
    out: str = ""
    """Where the full checkpoint goes (required): never the base or inside it; a new or empty directory unless
    ``overwrite``."""
    overwrite: bool = False
    """Replace an existing non-empty ``out`` (only once the new checkpoint is complete)."""
    allow_other_base: bool = False
    """Apply to a base other than the one the delta was trained from (another config or fingerprint): a warning
    instead of an error. Every tensor's shape and dtype is still checked."""
    dtype: str = ""
    """Load the base and write the checkpoint in this dtype (e.g. bfloat16), casting the delta to it. Empty: the
    delta's dtype, which reproduces the trained model exactly."""


def run(cfg: ApplyConfig, run_dir: Path) -> None:
    from connito.experts.delta import apply_delta  # here, not at the top: `connito --help` stays fast
    from connito.models.families import ModelError

    missing = [key for key in ("base", "delta", "out") if not getattr(cfg, key)]
    if missing:
        raise ModelError(
            f"connito apply needs {', '.join(f'{key}=<dir>' for key in missing)}: "
            "connito apply base=<checkpoint> delta=<delta package> out=<new directory>"
        )
    out = apply_delta(
        cfg.base,
        cfg.delta,
        cfg.out,
        overwrite=cfg.overwrite,
        allow_other_base=cfg.allow_other_base,
        dtype=cfg.dtype or None,
    )
    print(f"checkpoint: {out}")


COMMAND = Command(
    name="apply",
    summary="write a base checkpoint + an expert delta package as a full Hugging Face checkpoint",
    config_name="apply",
    schema=ApplyConfig,
    run=run,
)
