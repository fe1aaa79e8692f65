"""Typed config of ``connito analyze`` (the root of ``configs/analyze.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from connito.data.config import DataConfig


@dataclass
class DriversConfig:
    """The causal scan for driver experts (Hu et al. 2026): each expert's routing weight scaled up and down."""

    enabled: bool = True
    factor_up: float = 2.0
    """> 1: the boost."""
    factor_down: float = 0.5
    """In [0, 1): the suppression (0 removes the expert from the tokens that chose it)."""
    tokens: int = 8192
    """Held-out tokens the scan runs on (the statistics may stream more)."""
    experts_per_forward: int = 4
    """Experts perturbed in one forward (the batch is replicated twice per expert)."""


@dataclass
class AnalyzeConfig:
    """Root config of ``connito analyze``: which model, which data, what to measure, where to write."""

    model_path: str = ""
    """A ``save_pretrained`` directory, or a run directory of ``connito train`` (its ``hf/`` export is used).
    Empty: the quickstart's export, ``runs/quickstart/hf``."""
    data: DataConfig = field(default_factory=DataConfig)
    split: str = "validation"
    """The packed split to stream (held-out text by default)."""
    tokens: int = 65536
    """Tokens to stream for the routing statistics (rows spread evenly over the split)."""
    batch_size: int = 8
    min_tokens: int = 100
    """A domain with fewer tokens gets no scores (a warning names it)."""
    specialisation_threshold: float = 0.5
    """Specialisation (1 - entropy of an expert's routing over domains / log D) from which an expert counts as a
    domain expert."""
    drivers: DriversConfig = field(default_factory=DriversConfig)
    out_dir: str = ""
    """Where analysis.json, report.md and the pictures go. Empty: ``<model run>/analysis`` for a run directory,
    else ``<model_path>/analysis``."""
    progress: bool = True
