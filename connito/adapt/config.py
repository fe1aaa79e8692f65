"""Typed config of ``connito select`` (the root of ``configs/select.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SelectConfig:
    """Root config of ``connito select``: which analysis, which rule, which domains, where the mask file goes.
    The rules are in :mod:`connito.adapt.selection`."""

    analysis_path: str = ""
    """An ``analysis.json`` written by ``connito analyze``, or the directory holding it. Empty: the quickstart's,
    ``runs/quickstart/analysis``. (Not ``analysis=``: that name is the ``analysis`` config group of
    ``connito train``, and Hydra reads ``analysis=...`` as a group choice in every command.)"""
    method: str = "gate"
    """``gate`` (ESFT average gate score), ``token`` (ESFT token-selection ratio), ``driver`` (causal driver score)
    or ``list`` (the hand-written ``experts``)."""
    domains: list[str] = field(default_factory=list)
    """The domain(s) to select for, e.g. ``domains=[code]`` or ``domains=[code,docs]``."""
    combine: str = "pool"
    """Several domains: ``pool`` (token-weighted mean score, one selection) or ``union`` (one selection each)."""
    top_p: float = 0.2
    """Per layer, keep the fewest experts whose share of the layer's score reaches top_p, in (0, 1] (ESFT: 0.2)."""
    top_n: int | None = None
    """Instead of top_p: keep the n best-scored experts of each layer."""
    experts: list[str] = field(default_factory=list)
    """method=list: the experts to keep as ``layer:expert``, e.g. ``experts=[1:0,1:5,2:3]``."""
    out: str = ""
    """The mask file to write. Empty: ``mask-<method>-<domains>-p<top_p>.json`` beside the analysis.json."""
