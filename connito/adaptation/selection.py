"""Which experts a domain needs, read from an ``analysis.json`` (schema ``connito.analysis/1``, written by
``connito analyze``): :func:`select_experts` returns an :class:`~connito.experts.ExpertMask`.

Methods (``method=``):

* ``gate`` and ``token``: ESFT (Wang et al. 2024). The per-layer scores are ``esft.gate_score[domain]`` (average
  gate score of each expert over the domain's tokens) and ``esft.selection_ratio[domain]`` (share of the domain's
  top-k routing slots the expert received); both are normalised per layer. Reading of ESFT's released
  ``generate_expert_config.py`` (from memory, not checked here): per layer, sort the experts by score, descending,
  and append them one at a time until the cumulative score reaches ``top_p`` (``if cumsum >= top_p: break`` after
  appending). That is the smallest prefix whose score sum is >= ``top_p``, never empty in a layer that has any
  score. ESFT's default ``top_p`` is 0.2 (the paper sweeps 0.1 to 0.2).
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

Shape legend: L MoE layers (index i is ``moe_layers[i]``, as in analysis.json), E routed experts.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from connito.experts import ExpertMask

ANALYSIS_SCHEMA = "connito.analysis/1"
"""The schema tag ``connito analyze`` writes (``connito.analysis.report.SCHEMA``; a file contract, not an import)."""
SHARE_TOLERANCE = 1e-9
"""A cumulative share within this of ``top_p`` reaches it (float rounding of shares that add up to exactly it)."""
DEFAULT_TOP_P = 0.2
"""ESFT's default."""
COMBINES = ("pool", "union")


class SelectionError(ValueError):
    """Selection input Connito cannot use (analysis file, method, domain, threshold); the message names the fix."""


# -- analysis.json ---------------------------------------------------------------------------------------------


def analysis_file(path: str | Path) -> Path:
    """``path`` itself, or ``path/analysis.json`` when ``path`` is a directory."""
    path = Path(path).expanduser()
    return path / "analysis.json" if path.is_dir() else path


def load_analysis(path: str | Path) -> dict:
    """The parsed ``analysis.json`` at ``path`` (the file or its directory), checked for schema
    ``connito.analysis/1`` and the sections selection reads."""
    file = analysis_file(path)
    if not file.is_file():
        raise SelectionError(
            f"no analysis.json at {file}: run `connito analyze model_path=<checkpoint or run directory>` first, or "
            "point analysis_path= at the file or the directory holding it"
        )
    try:
        record = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise SelectionError(f"{file} is not valid JSON ({err}); re-run `connito analyze` to rewrite it") from None
    schema = record.get("schema") if isinstance(record, dict) else None
    if schema != ANALYSIS_SCHEMA:
        raise SelectionError(
            f"{file} is not a Connito analysis: schema {schema!r}, expected {ANALYSIS_SCHEMA!r}. Point "
            "analysis_path= at the analysis.json `connito analyze` wrote"
        )
    needed = {
        "model": ("fingerprint", "model_type", "num_layers", "moe_layers", "num_experts"),
        "data": ("domains", "tokens", "usable"),
        "esft": ("gate_score", "selection_ratio"),
    }
    for section, keys in needed.items():
        missing = [key for key in keys if key not in (record.get(section) or {})]
        if missing:
            raise SelectionError(f"{file}: section '{section}' lacks {missing}; re-run `connito analyze` to rewrite it")
    return record


# -- score sources (the registry) ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoreSource:
    """One way to score experts for a domain from an analysis record."""

    name: str
    """The ``method=`` value."""
    what: str
    """What the score is, for messages."""
    tokens: Callable[[dict], dict[str, int]]
    """Tokens each domain's score was measured on (the weights of ``combine=pool``)."""
    usable: Callable[[dict], list[str]]
    """The domains that have this score."""
    scores: Callable[[dict, str], list]
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


def methods() -> list[str]:
    return [*_SOURCES, "list"]


def _esft_source(name: str, key: str, what: str) -> ScoreSource:
    return ScoreSource(
        name=name,
        what=what,
        tokens=lambda analysis: {d: int(n) for d, n in analysis["data"]["tokens"].items()},
        usable=lambda analysis: [d for d in analysis["data"]["domains"] if analysis["data"]["usable"].get(d)],
        scores=lambda analysis, domain: analysis["esft"][key][domain],
        fix="stream more of its text (connito analyze tokens=...) or lower connito analyze's min_tokens",
    )


def _drivers(analysis: dict) -> dict:
    if analysis.get("drivers") is None:
        raise SelectionError(
            "analysis.json has no driver scores (connito analyze ran with drivers.enabled=false): re-run "
            "`connito analyze drivers.enabled=true`, or select with method=gate or method=token"
        )
    return analysis["drivers"]


register_score_source(_esft_source("gate", "gate_score", "ESFT average gate score"))
register_score_source(_esft_source("token", "selection_ratio", "ESFT token-selection ratio"))
register_score_source(
    ScoreSource(
        name="driver",
        what="driver score",
        tokens=lambda analysis: {d: int(n) for d, n in _drivers(analysis)["tokens"].items()},
        usable=lambda analysis: [d for d, n in _drivers(analysis)["tokens"].items() if n > 0],
        scores=lambda analysis, domain: _drivers(analysis)["score"][domain],
        fix="give the driver scan more tokens (connito analyze drivers.tokens=...)",
    )
)


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


# -- select_experts --------------------------------------------------------------------------------------------


def select_experts(
    analysis: dict,
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
    model = analysis["model"]
    num_layers, num_experts, moe_layers = int(model["num_layers"]), int(model["num_experts"]), list(model["moe_layers"])
    if method == "list":
        mask = ExpertMask.from_ids(parse_expert_list(experts), num_layers, num_experts, moe_layers)
        if not len(mask):
            raise SelectionError("experts= is empty: list the experts to keep, e.g. experts=[1:0,1:5,2:3]")
        return mask
    if method not in _SOURCES:
        raise SelectionError(f"method={method!r} is not a selection method; choose one of {methods()}")
    if experts:
        raise SelectionError(f"experts= is the hand-written list of method=list; method={method} selects by score")
    if combine not in COMBINES:
        raise SelectionError(f"combine={combine!r} must be one of {list(COMBINES)} (how several domains combine)")
    check_threshold(top_p, top_n, num_experts)
    source = _SOURCES[method]
    names = _check_domains(analysis, source, domains)
    score_DLE = torch.stack([_score_tensor(analysis, source, d, len(moe_layers), num_experts) for d in names])
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


def _check_domains(analysis: dict, source: ScoreSource, domains: str | Sequence[str]) -> list[str]:
    names = [domains] if isinstance(domains, str) else list(dict.fromkeys(domains))
    known = list(analysis["data"]["domains"])
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


def _score_tensor(analysis: dict, source: ScoreSource, domain: str, num_moe: int, num_experts: int) -> torch.Tensor:
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
