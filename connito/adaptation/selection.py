"""Which experts a domain needs, read from an ``analysis.json`` (schema ``connito.analysis/1``, written by
``connito analyze``): :func:`select_experts` returns an :class:`~connito.experts.ExpertMask`.

Methods (``method=``):

* ``gate`` and ``token``: ESFT (Wang et al. 2024). The per-layer scores are ``esft.gate_score[domain]`` (average
  top-k gate value of each expert over the domain's tokens, zero where a token did not choose it:
  :func:`connito.analysis.summaries.esft_gate_scores`) and ``esft.selection_ratio[domain]`` (share of the domain's
  top-k routing slots the expert received); both are normalised per layer. ESFT's released
  ``scripts/expert/generate_expert_config.py`` (deepseek-ai/ESFT, read 2026-12-05) sums the recorded top-k weights
  per expert (``gate_scores``) and ``1/top_k`` per choice (``token_scores``), then per layer sorts the experts by
  score, descending, and appends them one at a time until the cumulative score reaches ``top_p`` (``if
  current_score >= top_p: break`` before appending the next). That is the smallest prefix whose score sum is >=
  ``top_p``, never empty in a layer that has any score. (That script divides its [layers, experts] score arrays by
  their sum over *layers*, ``np.sum(..., axis=0)``; the paper's threshold is a share of each layer's mass, which is
  what Connito normalises by.) ESFT's default ``top_p`` is 0.2 (the paper sweeps 0.1 to 0.2).
* ``driver``: the causal driver scores ``drivers.score[domain]`` (nats a token loses when the expert is suppressed
  rather than boosted; Hu et al. 2026). Only experts with a score > 0 (the domain relies on them) are candidates;
  the same cumulative rule then runs on each layer's *positive* scores, normalised per layer: the smallest set of
  a layer's drivers carrying ``top_p`` of that layer's positive driver score. A layer with no positive score
  keeps no expert. With ``top_n`` every method keeps the n best candidates per layer instead.
* ``list``: a hand-written list, ``experts=[[layer, expert], ...]`` or ``"layer:expert,layer:expert"``.

Shared rule for the score methods (:func:`pick_per_layer`): candidates are the experts with a positive score (so
``top_p=1`` keeps exactly the experts the domain touched and never one it did not); ties go to the lower expert
index; a cumulative share within :data:`SHARE_TOLERANCE` of ``top_p`` reaches it (the scores in analysis.json are
rounded to 6 digits, so each layer is renormalised to sum 1 first).

Several domains (``combine=``):

* ``pool`` (default): the domains' scores averaged with their token counts as weights, then one selection. For
  ESFT scores this is exactly the score ESFT would compute on the domains' tokens pooled into one task (both are
  per-token means); for driver scores it is the pooled per-token loss difference.
* ``union``: each domain selects on its own (same rule, same ``top_p``); the mask is the union.

Score methods are a registry (:func:`register_score_source`): a new score is a :class:`ScoreSource`, no fork.
The registry, the analysis.json reader and the per-layer rule live in :mod:`connito.analysis.expert_scores` (shared
with :mod:`connito.composition.expert_groups`) and are re-exported here.

Shape legend: L MoE layers (index i is ``moe_layers[i]``, as in analysis.json), E routed experts.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch

from connito.analysis.expert_scores import (
    ANALYSIS_SCHEMA,
    DEFAULT_TOP_P,
    SHARE_TOLERANCE,
    ScoreSource,
    SelectionError,
    analysis_file,
    check_domains,
    check_threshold,
    load_analysis,
    pick_per_layer,
    register_score_source,
    score_source,
    score_sources,
    score_table,
)
from connito.analysis.record import AnalysisRecord, as_analysis
from connito.experts import ExpertMask

__all__ = [
    "ANALYSIS_SCHEMA",
    "COMBINES",
    "DEFAULT_TOP_P",
    "SHARE_TOLERANCE",
    "ScoreSource",
    "SelectionError",
    "analysis_file",
    "check_threshold",
    "load_analysis",
    "methods",
    "parse_expert_list",
    "pick_per_layer",
    "register_score_source",
    "select_experts",
]

COMBINES = ("pool", "union")


def methods() -> list[str]:
    return [*score_sources(), "list"]


# -- select_experts --------------------------------------------------------------------------------------------


def select_experts(
    analysis: AnalysisRecord | dict,
    method: str,
    domains: str | Sequence[str] = (),
    top_p: float = DEFAULT_TOP_P,
    experts: str | Sequence | None = None,
    *,
    top_n: int | None = None,
    combine: str = "pool",
) -> ExpertMask:
    """The experts ``method`` selects for ``domains`` (one name or several) from ``analysis`` (a parsed
    analysis.json, :func:`load_analysis`), as a mask over the analysed model's [num_layers, num_experts]. See the
    module docstring for the rules. ``experts`` is the hand-written list of ``method="list"`` (``domains`` and
    the thresholds are not used then). An empty selection is an error."""
    analysis = as_analysis(analysis)
    model = analysis.model
    num_layers, num_experts, moe_layers = model.num_layers, model.num_experts, list(model.moe_layers)
    if method == "list":
        mask = ExpertMask.from_ids(parse_expert_list(experts), num_layers, num_experts, moe_layers)
        if not len(mask):
            raise SelectionError("experts= is empty: list the experts to keep, e.g. experts=[1:0,1:5,2:3]")
        return mask
    if method not in score_sources():
        raise SelectionError(f"method={method!r} is not a selection method; choose one of {methods()}")
    if experts:
        raise SelectionError(f"experts= is the hand-written list of method=list; method={method} selects by score")
    if combine not in COMBINES:
        raise SelectionError(f"combine={combine!r} must be one of {list(COMBINES)} (how several domains combine)")
    check_threshold(top_p, top_n, num_experts)
    source = score_source(method)
    names = check_domains(analysis, source, domains)
    score_DLE = torch.stack([score_table(analysis, source, d) for d in names])
    if combine == "pool":
        tokens = source.tokens(analysis)
        weight_D = torch.tensor([float(tokens[d]) for d in names], dtype=torch.float64)
        keep_LE = pick_per_layer((score_DLE * weight_D[:, None, None]).sum(dim=0) / weight_D.sum(), top_p, top_n)
    else:
        keep_LE = torch.stack([pick_per_layer(score_LE, top_p, top_n) for score_LE in score_DLE]).any(dim=0)
    if not keep_LE.any():
        fix = "re-run `connito analyze` to rewrite analysis.json"
        if method == "driver":
            fix = "no expert measurably helps it; scan more tokens (connito analyze drivers.tokens=...) or select "
            fix += "with method=gate"
        raise SelectionError(
            f"no expert has a positive {source.what} for {', '.join(names)}, so the selection is empty: {fix}"
        )
    mask_LE = torch.zeros(num_layers, num_experts, dtype=torch.bool)
    mask_LE[moe_layers] = keep_LE
    return ExpertMask(mask_LE, moe_layers)


_PAIR = re.compile(r"^\s*(-?\d+)\s*:\s*(-?\d+)\s*$")


def parse_expert_list(experts: str | Sequence | None) -> list[tuple[int, int]]:
    """``[[layer, expert], ...]``, ``"layer:expert,layer:expert"`` or a list of such strings, as (layer, expert)
    pairs (checked against the model when set in a mask)."""
    if experts is None:
        return []
    items = [experts] if isinstance(experts, str) else list(experts)
    pairs = []
    for item in items:
        if isinstance(item, str):
            for part in filter(str.strip, item.split(",")):
                match = _PAIR.match(part)
                if match is None:
                    raise SelectionError(f"experts: '{part.strip()}' is not layer:expert (e.g. experts=[1:0,2:5])")
                pairs.append((int(match[1]), int(match[2])))
        elif isinstance(item, Sequence) and len(item) == 2 and all(_is_int(v) for v in item):
            pairs.append((int(item[0]), int(item[1])))
        else:
            raise SelectionError(f"experts: {item!r} is not a [layer, expert] pair or a 'layer:expert' string")
    return pairs


def _is_int(value) -> bool:
    return not isinstance(value, bool) and (
        isinstance(value, int) or (isinstance(value, float) and math.isfinite(value) and value.is_integer())
    )
