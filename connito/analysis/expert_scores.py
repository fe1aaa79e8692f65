"""Per-domain expert scores read from an ``analysis.json`` (schema ``connito.analysis/1``, written by ``connito
analyze``) and the per-layer rule that turns a score table into a set of experts.

Shared by every method that picks experts from an analysis: selection for adaptation
(:mod:`connito.adaptation.selection`, ``connito select``) and expert groups (:mod:`connito.composition.expert_groups`).
It lives here, beside the writer of the file, so methods never import each other.

Score sources are a registry (:func:`register_score_source`): ``gate`` and ``token`` (ESFT, Wang et al. 2024:
``esft.gate_score`` / ``esft.selection_ratio``, each layer normalised to sum 1) and ``driver`` (the causal driver
score ``drivers.score``, nats; Hu et al. 2026). :func:`pick_per_layer` is ESFT's rule: per layer, the smallest set
of positive-score experts whose share of the layer's positive score reaches ``top_p`` (or the ``top_n`` best).
:mod:`connito.adaptation.selection` documents the rule and its reading of ESFT's code in full.

Shape legend: L MoE layers (index i is ``moe_layers[i]``, as in analysis.json), E routed experts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from connito.analysis.record import SCHEMA as ANALYSIS_SCHEMA  # noqa: F401  (re-exported by selection)
from connito.analysis.record import AnalysisRecord, DriverScores, as_analysis

SHARE_TOLERANCE = 1e-9
"""A cumulative share within this of ``top_p`` reaches it (float rounding of shares that add up to exactly it)."""
DEFAULT_TOP_P = 0.2
"""ESFT's default."""


class SelectionError(ValueError):
    """Selection input Connito cannot use (analysis file, method, domain, threshold); the message names the fix."""


# -- analysis.json ---------------------------------------------------------------------------------------------


def analysis_file(path: str | Path) -> Path:
    """``path`` itself, or ``path/analysis.json`` when ``path`` is a directory."""
    return AnalysisRecord.file(path)


def load_analysis(path: str | Path) -> AnalysisRecord:
    """The :class:`~connito.analysis.record.AnalysisRecord` at ``path`` (the file or its directory), checked for
    schema ``connito.analysis/1`` and the sections selection reads; :class:`SelectionError` names the fix."""
    return AnalysisRecord.load(path, SelectionError)


# -- score sources (the registry) ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoreSource:
    """One way to score experts for a domain from an analysis record (:class:`AnalysisRecord`)."""

    name: str
    """The ``method=`` value."""
    what: str
    """What the score is, for messages."""
    tokens: Callable[[AnalysisRecord], dict[str, int]]
    """Tokens each domain's score was measured on (the weights of ``combine=pool``)."""
    usable: Callable[[AnalysisRecord], list[str]]
    """The domains that have this score."""
    scores: Callable[[AnalysisRecord, str], list]
    """``[moe layer][expert]`` nested lists (None: no score); higher = the domain needs the expert more."""
    fix: str
    """How to give a domain this score, for the error naming an unusable domain."""


_SOURCES: dict[str, ScoreSource] = {}


def register_score_source(source: ScoreSource, *, replace: bool = False) -> ScoreSource:
    if source.name in _SOURCES and not replace:
        raise ValueError(f"score source '{source.name}' is already registered (pass replace=True)")
    if source.name == "list":
        raise ValueError("'list' is the hand-written selection; name the score source otherwise")
    _SOURCES[source.name] = source
    return source


def score_sources() -> list[str]:
    """The registered score names, in registration order."""
    return list(_SOURCES)


def score_source(name: str) -> ScoreSource:
    if name not in _SOURCES:
        raise SelectionError(f"score {name!r} is not a registered expert score; choose one of {score_sources()}")
    return _SOURCES[name]


def _esft_source(name: str, key: str, what: str) -> ScoreSource:
    return ScoreSource(
        name=name,
        what=what,
        tokens=lambda analysis: {d: int(n) for d, n in analysis.data.tokens.items()},
        usable=lambda analysis: analysis.data.usable_domains,
        scores=lambda analysis, domain: getattr(analysis.esft, key)[domain],
        fix="stream more of its text (connito analyze tokens=...) or lower connito analyze's min_tokens",
    )


def _drivers(analysis: AnalysisRecord) -> DriverScores:
    if analysis.drivers is None:
        raise SelectionError(
            "analysis.json has no driver scores (connito analyze ran with drivers.enabled=false): re-run "
            "`connito analyze drivers.enabled=true`, or select with method=gate or method=token"
        )
    return analysis.drivers


register_score_source(_esft_source("gate", "gate_score", "ESFT average gate score"))
register_score_source(_esft_source("token", "selection_ratio", "ESFT token-selection ratio"))
register_score_source(
    ScoreSource(
        name="driver",
        what="driver score",
        tokens=lambda analysis: {d: int(n) for d, n in _drivers(analysis).tokens.items()},
        usable=lambda analysis: [d for d, n in _drivers(analysis).tokens.items() if n > 0],
        scores=lambda analysis, domain: _drivers(analysis).score[domain],
        fix="give the driver scan more tokens (connito analyze drivers.tokens=...)",
    )
)


def check_domains(analysis: AnalysisRecord | dict, source: ScoreSource, domains: str | Sequence[str]) -> list[str]:
    """``domains`` as a list without repeats, each known to ``analysis`` and scored by ``source``."""
    analysis = as_analysis(analysis)
    names = [domains] if isinstance(domains, str) else list(dict.fromkeys(domains))
    known = list(analysis.data.domains)
    usable = source.usable(analysis)
    listing = f"usable for method={source.name}: {', '.join(usable) or 'none'}"
    if not names:
        raise SelectionError(
            f"name the domain(s) to select experts for, e.g. domains=[{(usable or known)[0]}]; {listing}"
        )
    for name in names:
        if name not in known:
            raise SelectionError(
                f"domain '{name}' is not in analysis.json (its domains: {', '.join(known)}); {listing}"
            )
        if name not in usable:
            tokens = source.tokens(analysis).get(name, 0)
            raise SelectionError(
                f"domain '{name}' has no {source.what} in analysis.json (measured on {tokens} tokens): {source.fix}; "
                f"{listing}"
            )
    return names


def score_table(analysis: AnalysisRecord | dict, source: ScoreSource, domain: str) -> torch.Tensor:
    """``score_LE`` (float64, NaN where the file has no score) of ``domain`` by ``source``, checked to be a
    [MoE layers, experts] table of the analysed model."""
    analysis = as_analysis(analysis)
    num_moe, num_experts = len(analysis.model.moe_layers), analysis.model.num_experts
    rows = source.scores(analysis, domain)
    nan = float("nan")
    try:
        score_LE = torch.tensor([[nan if v is None else float(v) for v in row] for row in rows], dtype=torch.float64)
    except (TypeError, ValueError):
        score_LE = None
    if score_LE is None or tuple(score_LE.shape) != (num_moe, num_experts):
        raise SelectionError(
            f"analysis.json's {source.what} of '{domain}' is not a [{num_moe} MoE layers][{num_experts} experts] "
            "table of numbers; re-run `connito analyze` to rewrite the file"
        )
    return score_LE


# -- the per-layer rule ----------------------------------------------------------------------------------------


def check_threshold(top_p: float, top_n: int | None, num_experts: int) -> None:
    if top_n is not None:
        if isinstance(top_n, bool) or not isinstance(top_n, int) or not 1 <= top_n <= num_experts:
            raise SelectionError(
                f"top_n={top_n!r} must be a whole number of experts per layer between 1 and {num_experts}; or leave "
                "it unset (top_n=null) to select by the cumulative share top_p"
            )
        return
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise SelectionError(
            f"top_p={top_p!r} is outside (0, 1]: it is the share of each layer's score the selected experts must "
            f"reach (ESFT uses 0.1 to 0.2; 1 keeps every expert the domain used). Set e.g. top_p={DEFAULT_TOP_P}"
        )


def layer_shares(score_LE: torch.Tensor) -> torch.Tensor:
    """``share_LE`` (float64): each expert's positive score over its layer's positive total (0 for a score <= 0 or
    NaN, and in a layer with no positive score). The quantity :func:`pick_per_layer` accumulates."""
    positive_LE = torch.where(score_LE > 0, score_LE, torch.zeros_like(score_LE)).to(torch.float64)
    total_L = positive_LE.sum(dim=-1, keepdim=True)
    return positive_LE / torch.where(total_L > 0, total_L, 1.0)


def pick_per_layer(score_LE: torch.Tensor, top_p: float = DEFAULT_TOP_P, top_n: int | None = None) -> torch.Tensor:
    """``keep_LE`` (bool): per layer, the positive-score experts ranked by score (ties to the lower index) and kept
    while the cumulative share of the layer's positive score *before* the expert is below ``top_p`` (ESFT's loop:
    the smallest prefix reaching ``top_p``), or the first ``top_n`` of them. NaN scores are never kept."""
    positive_LE = torch.where(score_LE > 0, score_LE, torch.zeros_like(score_LE)).to(torch.float64)
    sorted_LE, order_LE = positive_LE.sort(dim=-1, descending=True, stable=True)
    if top_n is not None:
        ranked_LE = torch.arange(score_LE.shape[-1]).expand_as(sorted_LE) < top_n
    else:
        total_L = sorted_LE.sum(dim=-1, keepdim=True)
        share_LE = sorted_LE / torch.where(total_L > 0, total_L, 1.0)
        before_LE = torch.cat([torch.zeros_like(share_LE[:, :1]), share_LE.cumsum(dim=-1)[:, :-1]], dim=-1)
        ranked_LE = before_LE < top_p - SHARE_TOLERANCE
    keep_sorted_LE = ranked_LE & (sorted_LE > 0)
    return torch.zeros_like(keep_sorted_LE).scatter(-1, order_LE, keep_sorted_LE)
