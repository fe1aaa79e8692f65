"""``connito merge checkpoint=<dir> keep=<n> out=<dir>`` (or ``'groups=[[layer,e,e],...]'``): merge experts that do
the same job (:mod:`connito.retirement.merging`): per MoE layer, groups of similar experts (by co-activation from
the checkpoint's analysis, or by weight similarity) become one expert, their weights averaged by usage and their
router rows combined; the other members are removed by surgery. Writes the checkpoint and the held-out loss per
domain before and after (``merge_report.json`` / ``.md`` in ``out``); the input checkpoint is never written to."""

from dataclasses import dataclass, field
from pathlib import Path

from connito.cli.command import Command
from connito.data.config import DataConfig
from connito.retirement.records import MergeReport


@dataclass
class ExpertMergeConfig:
    """Root config of ``connito merge`` (similar experts of one checkpoint merged into one; the ``merge.*`` of
    ``connito groups`` is :class:`~connito.orchestration.groups.GroupMergeConfig`). Kept here, not beside
    ``merge_checkpoint``: importing ``connito.retirement`` loads torch, and ``connito --help`` reads every command's
    config."""

    checkpoint: str = ""
    """The ``save_pretrained`` MoE checkpoint to merge experts of (required; never modified)."""
    keep: int | None = None
    """Merge similar experts until every MoE layer has ``keep`` (at least the model's top-k, fewer than it has);
    unset: merge ``groups``."""
    groups: list[list[int]] = field(default_factory=list)
    """Explicit groups instead of ``keep``: ``[[layer, expert, expert, ...], ...]``, the first expert of each the slot
    the merged expert takes. Every MoE layer must lose as many experts (one expert count per config)."""
    similarity: str = "coactivation"
    """With ``keep``: ``coactivation`` (how often two experts share a token's top-k, from the analysis) or
    ``weight`` (cosine similarity of their weights)."""
    frequency: str = "token"
    """How members are weighed in the average: ``token`` (usage: the analysis's token-selection ratio pooled over
    ``domains``) or ``uniform``."""
    analysis_path: str = ""
    """The checkpoint's ``analysis.json`` (or its directory), for ``frequency=token`` and
    ``similarity=coactivation``. Empty: ``<checkpoint>/analysis`` or, for a run's ``hf`` export, ``<run>/analysis``."""
    domains: list[str] = field(default_factory=list)
    """The workload whose usage weighs the members (pooled, token-weighted). Empty: every domain the analysis
    scored."""
    out: str = ""
    """Where the merged checkpoint goes (required): a new or empty directory unless ``overwrite``."""
    overwrite: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    """The text the retained quality is measured on: held-out split of every domain of ``data.domains``, with the
    checkpoint's tokenizer."""
    eval_tokens: int = 32768
    """Held-out tokens per domain for the before/after table; 0: do not measure."""


def run(cfg: ExpertMergeConfig, run_dir: Path) -> None:

    from connito.cli.before_after import write_before_after_report
    from connito.cli.commands.prune import default_analysis
    from connito.models.families import ModelError
    from connito.retirement.merging import merge_checkpoint  # here, not at the top: `connito --help` stays fast

    missing = [key for key in ("checkpoint", "out") if not getattr(cfg, key)]
    if missing or (cfg.keep is not None) == bool(cfg.groups):
        raise ModelError(
            "connito merge needs checkpoint=<dir>, out=<dir> and either keep=<experts per layer> or "
            "'groups=[[layer,expert,expert],...]' (not both)" + (f"; missing: {', '.join(missing)}" if missing else "")
        )
    uses_analysis = cfg.frequency == "token" or (cfg.keep is not None and cfg.similarity == "coactivation")
    analysis = (cfg.analysis_path or default_analysis(Path(cfg.checkpoint))) if uses_analysis else None
    out, plan = merge_checkpoint(
        cfg.checkpoint, cfg.out, groups=cfg.groups or None, keep=cfg.keep, similarity=cfg.similarity,
        frequency=cfg.frequency, analysis_path=analysis, domains=cfg.domains or None, overwrite=cfg.overwrite,
    )  # fmt: skip
    groups = [[g.layer, *g.experts] for g in plan.groups]
    kept = {str(layer): experts for layer, experts in plan.kept.items()}
    how = f"by {cfg.similarity} similarity" if cfg.keep is not None else "as listed"
    similarity = cfg.similarity if cfg.keep is not None else None
    record = MergeReport(checkpoint=str(Path(cfg.checkpoint).resolve()), keep=cfg.keep, similarity=similarity,
                         frequency=cfg.frequency, groups=groups, shares=[list(g.shares) for g in plan.groups],
                         kept=kept)  # fmt: skip
    experts_left = len(next(iter(plan.kept.values())))
    text = [f"# Merged to {experts_left} experts per MoE layer ({how}, {cfg.frequency}-weighted)\n",
            "groups [layer, experts...], the first the merged slot: " + str(groups)]  # fmt: skip
    label = f"merged to {experts_left}"
    write_before_after_report("merge", cfg.checkpoint, out, label, record, text, cfg.data, cfg.eval_tokens)


COMMAND = Command(
    name="merge",
    summary="merge similar experts (co-activation or weights) into one per group, usage-weighted, with before/after "
    "loss",
    config_name="merge",
    schema=ExpertMergeConfig,
    run=run,
)
