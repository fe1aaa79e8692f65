"""``connito prune checkpoint=<dir> analysis_path=<analysis.json> keep=<n> out=<dir>``: one-shot pruning
(:mod:`connito.retirement.pruning`): keep the ``keep`` highest-scoring experts of every MoE layer (by usage from an
analysis, or by REAP saliency measured on calibration text with ``score=reap``), write the checkpoint without the
others, and measure held-out loss per domain before and after (``prune_report.json`` / ``.md`` in ``out``)."""

from dataclasses import dataclass, field
from pathlib import Path

from connito.cli.command import Command
from connito.data.config import DataConfig
from connito.retirement.records import PruneReport


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
    keep: int | None = None
    """Experts to keep in every MoE layer (required): at least the model's top-k, fewer than it has."""
    score: str = "token"
    """Usage from the analysis: ``token`` (ESFT token-selection ratio: how often the router chose the expert) or
    ``gate`` (ESFT average gate score); or ``reap``: REAP saliency (mean over the tokens routed to the expert of
    gate weight x expert output norm), measured on ``calibration_tokens`` of ``data`` (no analysis needed)."""
    domains: list[str] = field(default_factory=list)
    """The workload: the domains whose usage counts (pooled, token-weighted), or whose text calibrates REAP.
    Empty: every domain the analysis scored (``reap``: every domain of ``data.domains``)."""
    calibration_tokens: int = 32768
    """``score=reap``: calibration tokens per workload domain (rows spread evenly over ``calibration_split``)."""
    calibration_split: str = "train"
    """``score=reap``: the packed split the calibration text comes from (``train``: the held-out loss is measured
    on ``validation``, text the saliency never saw)."""
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


def check_keep_range(checkpoint: str, keep: int) -> None:
    """Refuse a ``keep`` outside [top-k, experts per layer - 1] of ``checkpoint``'s config, before any work."""
    from transformers import AutoConfig

    from connito.models.families import get_family
    from connito.models.loading import validate_checkpoint_dir
    from connito.retirement.pruning import PruningError, check_keep

    layout = get_family(validate_checkpoint_dir(checkpoint, setting="checkpoint")["model_type"]).layout
    if layout is None:
        return  # a dense model: the pruning refuses it with its own message
    config = AutoConfig.from_pretrained(checkpoint, local_files_only=True)  # its attribute names, as the view reads
    num_experts, top_k = getattr(config, layout.num_experts_key, None), getattr(config, layout.top_k_key, None)
    if not (isinstance(num_experts, int) and isinstance(top_k, int)):
        return  # an unusual config: the pruning itself checks keep against the model it loads
    if keep < 1:
        raise PruningError(
            f"keep={keep} is not a number of experts to keep: give keep between the model's top-k ({top_k}) and "
            f"{num_experts - 1} (it has {num_experts} experts per MoE layer)"
        )
    check_keep(keep, num_experts, top_k)


def run(cfg: PruneConfig, run_dir: Path) -> None:

    from connito.analysis.held_out import held_out_batches
    from connito.cli.before_after import write_before_after_report
    from connito.models.families import ModelError
    from connito.retirement.pruning import prune_checkpoint  # here, not at the top: `connito --help` stays fast

    missing = [key for key in ("checkpoint", "out") if not getattr(cfg, key)] + (["keep"] if cfg.keep is None else [])
    if missing:
        raise ModelError(
            "connito prune needs checkpoint=<dir>, keep=<experts per layer> and out=<dir> (analysis_path=<its "
            f"analysis.json> unless it is <checkpoint>/analysis); missing: {', '.join(missing)}"
        )
    check_keep_range(cfg.checkpoint, cfg.keep)
    analysis, calibration = None, None
    if cfg.score == "reap":
        workload = list(cfg.domains or cfg.data.domains)
        calibration = held_out_batches(cfg.data, cfg.checkpoint, domains=workload, split=cfg.calibration_split,
                                       eval_tokens=cfg.calibration_tokens * len(workload))  # fmt: skip
    else:
        analysis = cfg.analysis_path or default_analysis(Path(cfg.checkpoint))
    out, plan = prune_checkpoint(cfg.checkpoint, analysis, cfg.keep, cfg.out, score=cfg.score, calibration=calibration,
                                 domains=cfg.domains or None, overwrite=cfg.overwrite)  # fmt: skip
    kept = {str(layer): experts for layer, experts in plan.kept.items()}
    calibrated = None
    if calibration is not None:
        calibrated = {"split": cfg.calibration_split, "domains": calibration.domains,
                      "tokens": sum(int(batch.numel()) for batch in calibration.inputs)}  # fmt: skip
    record = PruneReport(checkpoint=str(Path(cfg.checkpoint).resolve()), keep=cfg.keep, score=cfg.score, kept=kept,
                         removed=[list(e) for e in plan.removed], scores=plan.usage_LE.tolist(),
                         calibration=calibrated)  # fmt: skip
    by = "REAP saliency" if cfg.score == "reap" else f"{cfg.score} usage"
    text = [f"# Pruned to {cfg.keep} experts per MoE layer (by {by})\n", "kept per layer: " + str(kept)]
    label = f"pruned to {cfg.keep}"
    write_before_after_report("prune", cfg.checkpoint, out, label, record, text, cfg.data, cfg.eval_tokens)


COMMAND = Command(
    name="prune",
    summary="one-shot pruning: keep the n most-used (analysis) or most salient (REAP) experts per layer, with "
    "before/after loss",
    config_name="prune",
    schema=PruneConfig,
    run=run,
)
