"""``connito prune checkpoint=<dir> analysis_path=<analysis.json> keep=<n> out=<dir>``: one-shot pruning by usage
(:mod:`connito.retirement.pruning`): keep the ``keep`` most-used experts of every MoE layer, write the checkpoint
without the others, and measure held-out loss per domain before and after (``prune_report.json`` / ``.md`` in
``out``)."""

from dataclasses import dataclass, field
from pathlib import Path

from connito.cli.command import Command
from connito.data.config import DataConfig


@dataclass
class PruneConfig:
    """Root config of ``connito prune``. Kept here, not beside ``prune_checkpoint``: importing
    ``connito.retirement`` loads torch, and ``connito --help`` reads every command's config."""

    checkpoint: str = ""
    """The ``save_pretrained`` MoE checkpoint to prune (required; never modified)."""
    analysis_path: str = ""
    """Its ``analysis.json`` (``connito analyze model_path=<checkpoint>``), or the directory holding it. Empty:
    where ``connito analyze`` writes by default, ``<checkpoint>/analysis`` or, for a run's ``hf`` export,
    ``<run>/analysis``; the analysis must be of this very checkpoint (fingerprint)."""
    keep: int = 0
    """Experts to keep in every MoE layer (required): at least the model's top-k, fewer than it has."""
    score: str = "token"
    """Usage: ``token`` (ESFT token-selection ratio: how often the router chose the expert) or ``gate`` (ESFT
    average gate score)."""
    domains: list[str] = field(default_factory=list)
    """The workload: the domains whose usage counts (pooled, token-weighted). Empty: every domain the analysis
    scored."""
    out: str = ""
    """Where the pruned checkpoint goes (required): a new or empty directory unless ``overwrite``."""
    overwrite: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    """The text the retained quality is measured on: held-out split of every domain of ``data.domains``, with the
    checkpoint's tokenizer."""
    eval_tokens: int = 32768
    """Held-out tokens per domain for the before/after table; 0: do not measure."""


def default_analysis(checkpoint: Path) -> str:
    """Where ``connito analyze`` put the checkpoint's analysis by default: ``<checkpoint>/analysis``, or
    ``<run>/analysis`` for a run's ``<run>/hf`` export."""
    for candidate in (checkpoint / "analysis", checkpoint.parent / "analysis"):
        if (candidate / "analysis.json").is_file():
            return str(candidate)
    return str(checkpoint / "analysis")  # absent: load_analysis says how to make it


def run(cfg: PruneConfig, run_dir: Path) -> None:
    import json

    from connito.analysis.held_out import checkpoint_losses, held_out_batches, losses_table
    from connito.models.families import ModelError
    from connito.retirement.pruning import prune_checkpoint  # here, not at the top: `connito --help` stays fast

    missing = [key for key in ("checkpoint", "out") if not getattr(cfg, key)] + ([] if cfg.keep else ["keep"])
    if missing:
        raise ModelError(
            "connito prune needs checkpoint=<dir>, keep=<experts per layer> and out=<dir> (analysis_path=<its "
            f"analysis.json> unless it is <checkpoint>/analysis); missing: {', '.join(missing)}"
        )
    analysis = cfg.analysis_path or default_analysis(Path(cfg.checkpoint))
    out, plan = prune_checkpoint(cfg.checkpoint, analysis, cfg.keep, cfg.out, score=cfg.score,
                                 domains=cfg.domains or None, overwrite=cfg.overwrite)  # fmt: skip
    kept = {str(layer): experts for layer, experts in plan.kept.items()}
    record = {"schema": "connito.prune/1", "checkpoint": str(Path(cfg.checkpoint).resolve()), "keep": cfg.keep,
              "score": cfg.score, "kept": kept, "removed": [list(e) for e in plan.removed]}  # fmt: skip
    text = [f"# Pruned to {cfg.keep} experts per MoE layer (by {cfg.score} usage)\n", "kept per layer: " + str(kept)]
    if cfg.eval_tokens > 0:
        domains = list(cfg.data.domains)  # every domain: what a workload-specific prune costs the others too
        held_out = held_out_batches(
            cfg.data, cfg.checkpoint, domains=domains, eval_tokens=cfg.eval_tokens * len(domains)
        )
        rows = {
            "original": checkpoint_losses(cfg.checkpoint, held_out),
            f"pruned to {cfg.keep}": checkpoint_losses(out, held_out),
        }
        record["validation_loss"] = rows
        table = losses_table(rows, [*held_out.domains, "all"])
        text += ["", "Held-out loss per domain (nats):", "", table]
        print(table)
    (out / "prune_report.json").write_text(json.dumps(record, indent=1) + "\n")
    (out / "prune_report.md").write_text("\n".join(text) + "\n")
    print(f"written:    {out} (report: {out / 'prune_report.md'})")


COMMAND = Command(
    name="prune",
    summary="one-shot pruning: keep the n most-used experts per layer (from an analysis), with before/after loss",
    config_name="prune",
    schema=PruneConfig,
    run=run,
)
