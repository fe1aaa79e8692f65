"""``connito select``: read an analysis.json, select experts, write the mask file and say what it holds."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from connito.adaptation.config import SelectConfig
from connito.adaptation.selection import analysis_file, load_analysis, parse_expert_list, select_experts
from connito.experts import ParameterCount
from connito.experts.mask_file import MaskFile, parameter_count, read_mask_file, write_mask_file

log = logging.getLogger("connito.adaptation")


def default_mask_name(cfg: SelectConfig) -> str:
    """``mask-<method>-<domains>-p<top_p>.json`` (``n<top_n>`` with top_n; ``mask-list.json`` for a list)."""
    if cfg.method == "list":
        return "mask-list.json"
    domains = "+".join(re.sub(r"[^\w.-]+", "_", d) for d in cfg.domains)
    rule = f"n{cfg.top_n}" if cfg.top_n is not None else f"p{cfg.top_p:g}"
    union = "-union" if cfg.combine == "union" and len(cfg.domains) > 1 else ""
    return f"mask-{cfg.method}-{domains}-{rule}{union}.json"


def _model_parameters(model: dict) -> tuple[ParameterCount | None, str]:
    """The analysed model's parameter counts from its config (meta device), or None and why not."""
    path = Path(str(model.get("path") or "")).expanduser()
    if not (path / "config.json").is_file():
        return None, f"the analysed model is no longer at '{path}'"
    try:
        counts = parameter_count(path)
    except Exception as err:  # a config transformers cannot build: the share is a nicety, the mask is not
        return None, f"could not build {path}'s config ({type(err).__name__}: {err})"
    if counts.num_routed_experts != len(model["moe_layers"]) * int(model["num_experts"]):
        return None, f"the model now at {path} has another shape than the analysed one"
    return counts, ""


def run_select(cfg: SelectConfig) -> MaskFile:
    """Select, write the mask file, and return it as read back (checked against the analysed model's
    fingerprint)."""
    from connito.models.default_paths import default_analysis

    source = analysis_file(cfg.analysis_path or default_analysis())
    analysis = load_analysis(source)
    experts = parse_expert_list(cfg.experts) if cfg.experts else None
    mask = select_experts(
        analysis, cfg.method, list(cfg.domains), cfg.top_p, experts, top_n=cfg.top_n, combine=cfg.combine
    )
    by_score = cfg.method != "list"
    selection = {
        "method": cfg.method,
        "domains": list(cfg.domains),
        "combine": cfg.combine if by_score else None,
        "top_p": cfg.top_p if by_score and cfg.top_n is None else None,
        "top_n": cfg.top_n if by_score else None,
        "experts": [list(pair) for pair in experts] if experts else None,
        "source": str(source.resolve()),
    }
    model = analysis.model.to_dict()
    parameters, why_not = _model_parameters(model)
    if parameters is None:
        log.info("share of parameters not computed: %s", why_not)
    out = Path(cfg.out).expanduser() if cfg.out else source.parent / default_mask_name(cfg)
    path = write_mask_file(out, mask, model, selection, parameters)
    return read_mask_file(path, analysis.model.fingerprint)


def summary_text(mask_file: MaskFile) -> str:
    """A few lines: how many experts each MoE layer keeps, and their share of routed experts and parameters."""
    counts, model, mask = mask_file.counts, mask_file.model, mask_file.mask
    share = f"{counts.selected} of {counts.routed_experts} routed experts ({100 * counts.routed_share:.1f} %)"
    if counts.parameters is not None:
        share += f"; {100 * counts.parameters['share']:.2f} % of the model's parameters"
    lines = [f"selected:   {share}", f"{'layer':>7}  {'kept':<7}  experts"]
    for layer in mask.moe_layers:
        kept = [e for lay, e in mask.ids() if lay == layer]
        fraction = f"{len(kept)}/{model.num_experts}"
        lines.append(f"{layer:>7}  {fraction:<7}  {' '.join(map(str, kept)) or '-'}")
    return "\n".join(lines)
