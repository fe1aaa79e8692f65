"""Typed configs of ``connito analyze`` (the root of ``configs/analyze.yaml``) and of the report ``connito train``
writes for its final model (``analysis=report``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from connito.data.config import DataConfig


@dataclass
class DriversConfig:
    """The causal scan for driver experts (Hu et al. 2026): each expert's routing weight scaled up and down. Its
    cost grows with layers x experts: 2 x L x E / experts_per_forward forwards of ``tokens`` tokens."""

    enabled: bool = True
    factor_up: float = 2.0
    """> 1: the boost."""
    factor_down: float = 0.5
    """In [0, 1): the suppression (0 removes the expert from the tokens that chose it)."""
    tokens: int = 8192
    """Held-out tokens the scan runs on (the statistics may stream more); single-expert sufficiency and the
    reweighting effect are measured on the same rows."""
    experts_per_forward: int = 4
    """Experts perturbed in one forward (the batch is replicated twice per expert)."""


@dataclass
class SufficiencyConfig:
    """Single-expert sufficiency (Yuan et al. 2025): loss and next-token agreement when every token keeps only its
    top-1 expert, per domain (two forwards of the scan rows)."""

    enabled: bool = True


@dataclass
class ReweightingConfig:
    """Boost each domain's chosen experts at inference and measure every domain's loss under it (Hu et al. 2026
    boost driver and domain experts); see :mod:`connito.analysis.reweighting_effect`."""

    enabled: bool = False
    factor: float = 1.5
    """> 0; 1 changes nothing."""
    mode: str = "weight_scale"
    """weight_scale (the expert's weight times ``factor`` where chosen) or logit_bias (ln factor on its router
    logit, before the choice); see :mod:`connito.analysis.reweighting`."""
    targets: list[str] = field(default_factory=lambda: ["drivers", "domain_experts"])
    """Which experts a domain's boost raises: its strongest positive ``drivers``, its ``domain_experts``, or both."""
    drivers_per_domain: int = 4
    """How many driver experts (highest positive score, across layers) each domain boosts."""
    export: bool = False
    """Also write each domain's boost folded into the weights, ``<out_dir>/reweighted-<domain>/`` (plain
    transformers loads it); refused before any work where the family's routing allows no exact fold."""


@dataclass
class AnalysisOptions:
    """What to measure and how much: shared by ``connito analyze`` and ``connito train analysis=report``."""

    tokens: int = 65536
    """Tokens to stream for the routing statistics (rows spread evenly over the split)."""
    batch_size: int = 8
    min_tokens: int = 100
    """A domain with fewer tokens gets no scores (a warning names it)."""
    specialisation_threshold: float = 0.5
    """Specialisation (1 - entropy of an expert's routing over domains / log D) from which an expert counts as a
    domain expert."""
    drivers: DriversConfig = field(default_factory=DriversConfig)
    sufficiency: SufficiencyConfig = field(default_factory=SufficiencyConfig)
    reweighting: ReweightingConfig = field(default_factory=ReweightingConfig)
    progress: bool = True


@dataclass
class AnalyzeConfig(AnalysisOptions):
    """Root config of ``connito analyze``: which model, which data, what to measure, where to write."""

    model_path: str = ""
    """A ``save_pretrained`` directory, or a run directory of ``connito train`` (its ``hf/`` export is used).
    Empty: what ``connito quickstart`` or ``connito train`` wrote last, ``runs/lifecycle/base/hf`` or
    ``runs/quickstart/hf`` (:mod:`connito.models.default_paths`)."""
    data: DataConfig = field(default_factory=DataConfig)
    split: str = "validation"
    """The packed split to stream (held-out text by default)."""
    out_dir: str = ""
    """Where analysis.json, report.md and the pictures go. Empty: ``<model run>/analysis`` for a run directory,
    else ``<model_path>/analysis``."""
