"""Expert groups: the loss gate a merge passes before it is published (:mod:`connito.composition.expert_groups`).

:func:`held_out_validator` builds the ``validate`` that
:func:`~connito.composition.expert_groups.merge.merge_groups` calls on the staged checkpoint: held-out loss per
domain of base and merged model on the same rows (:mod:`connito.analysis.held_out`), then :func:`validate_merge`,
which refuses when any domain's merged loss exceeds its base loss by more than ``max_regression`` nats (default
:data:`DEFAULT_MAX_REGRESSION`; see the merge module for why 0.02).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from connito.composition.expert_groups.merge import GroupMergeError
from connito.data.config import DataConfig

DEFAULT_MAX_REGRESSION = 0.02
"""Nats per token a domain's held-out loss may rise from base to merged model (about 2 % perplexity)."""


def validate_merge(
    base_losses: Mapping[str, float],
    merged_losses: Mapping[str, float],
    max_regression: float | Mapping[str, float] = DEFAULT_MAX_REGRESSION,
) -> None:
    """Refuse (:class:`GroupMergeError`, with a table of the numbers) when any domain's merged held-out loss exceeds
    its base loss by more than ``max_regression`` nats (one number, or one per domain of ``base_losses``), or is not
    a finite number."""
    domains = list(base_losses)
    missing = [d for d in domains if d not in merged_losses]
    if missing:
        raise GroupMergeError(f"the merged model's losses lack {missing}: measure it on the base's domains {domains}")
    allowed = {}
    for domain in domains:
        limit = max_regression.get(domain) if isinstance(max_regression, Mapping) else max_regression
        if limit is None or not math.isfinite(limit) or limit < 0:
            raise GroupMergeError(
                f"max_regression for '{domain}' is {limit!r}: give a finite number of nats >= 0 for every domain"
            )
        allowed[domain] = float(limit)
    rows, refused = [], []
    for domain in domains:
        base, merged = float(base_losses[domain]), float(merged_losses[domain])
        change = merged - base
        ok = math.isfinite(base) and math.isfinite(merged) and change <= allowed[domain]
        refused += [] if ok else [domain]
        verdict = "ok" if ok else "REFUSED"
        rows.append(f"| {domain} | {base:.4f} | {merged:.4f} | {change:+.4f} | {allowed[domain]:+.4f} | {verdict} |")
    if refused:
        table = "\n".join(["| domain | base | merged | change | allowed | |", "|---|---|---|---|---|---|", *rows])
        raise GroupMergeError(
            f"the merged model's held-out loss rose more than allowed on {', '.join(refused)} (nats per token):\n"
            f"{table}\nThe groups interfere: retrain them on smaller or disjoint-by-routing groups (lower top_p), or "
            "allow more with max_regression (merge.max_regression in `connito groups`)"
        )


def held_out_losses(
    model_dir: str | Path,
    data_cfg: DataConfig,
    domains: Sequence[str],
    eval_tokens: int = 65536,
    *,
    tokenizer_dir: str | Path | None = None,
    micro_batch_size: int = 8,
) -> dict[str, float]:
    """Mean next-token loss (nats) per domain of the checkpoint at ``model_dir`` on about ``eval_tokens`` held-out
    tokens (rows spread evenly over the validation split; :mod:`connito.analysis.held_out`), tokenized with
    ``data_cfg.tokenizer_path``, else ``tokenizer_dir``, else the checkpoint's own tokenizer."""
    from connito.analysis.held_out import checkpoint_losses, held_out_batches

    tokenizer = tokenizer_dir or model_dir
    held = held_out_batches(
        data_cfg, tokenizer, domains=list(domains), eval_tokens=eval_tokens, micro_batch_size=micro_batch_size
    )
    return _per_domain(checkpoint_losses(model_dir, held), domains, model_dir)


def held_out_validator(
    base: str | Path,
    data_cfg: DataConfig,
    domains: Sequence[str],
    *,
    eval_tokens: int = 65536,
    max_regression: float | Mapping[str, float] = DEFAULT_MAX_REGRESSION,
    micro_batch_size: int = 8,
) -> Callable[[Path], dict]:
    """A ``validate`` for :func:`merge_groups`: the held-out losses of ``base`` and of the staged merge on the same
    rows (tokenized with the base's tokenizer), then :func:`validate_merge`; returns the numbers it measured."""
    from connito.analysis.held_out import checkpoint_losses, held_out_batches

    def validate(stage: Path) -> dict:
        held = held_out_batches(
            data_cfg, base, domains=list(domains), eval_tokens=eval_tokens, micro_batch_size=micro_batch_size
        )
        base_losses = _per_domain(checkpoint_losses(base, held), domains, base)
        merged_losses = _per_domain(checkpoint_losses(stage, held), domains, "the merged model")
        validate_merge(base_losses, merged_losses, max_regression)
        limit = dict(max_regression) if isinstance(max_regression, Mapping) else max_regression
        return {"eval_tokens": eval_tokens, "max_regression": limit, "base": base_losses, "merged": merged_losses}

    return validate


def _per_domain(losses: Mapping[str, float], domains: Sequence[str], what) -> dict[str, float]:
    unknown = [d for d in domains if d not in losses]
    if unknown:
        known = [d for d in losses if d != "all"]
        raise GroupMergeError(f"the held-out data has no domain {unknown} (its domains: {known}); check data.domains")
    empty = [d for d in domains if not math.isfinite(losses[d])]
    if empty:
        raise GroupMergeError(f"{what}: no held-out token of {empty} to measure; give more eval_tokens or data")
    return {d: float(losses[d]) for d in domains}
