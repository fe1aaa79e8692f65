"""``connito share checkpoint=<dir> per_layer=<n> out=<dir>``: shared experts from driver experts
(:mod:`connito.retirement.sharing`): in every MoE layer, merge the ``per_layer`` experts the analysis ranks first
(``pick=driver``: the causal scan's drivers; ``token``: the most-used) into the shared expert, take them out of
routing, distil the new shared part against the original layer's output, and measure held-out loss per domain
before and after (``share_report.json`` / ``.md`` in ``out``)."""

from dataclasses import dataclass, field
from pathlib import Path

from connito.cli.command import Command
from connito.data.config import DataConfig
from connito.retirement.records import ShareReport


@dataclass
class DistillConfig:
    steps: int = 200
    """Adam steps per MoE layer on the new shared part (0: keep the plain merge)."""
    lr: float = 0.001
    tokens: int = 16384
    """Training tokens (every domain of the workload together) whose layer inputs and outputs are the data."""


@dataclass
class ShareConfig:
    """Root config of ``connito share``; kept here so ``connito --help`` does not import torch."""

    checkpoint: str = ""
    """The ``save_pretrained`` MoE checkpoint (DeepSeek-V2/V3 or Qwen2-MoE: a family with a shared-expert slot;
    required, never modified)."""
    analysis_path: str = ""
    """Its ``analysis.json`` (``connito analyze model_path=<checkpoint>``; with the driver scan for
    ``pick=driver``), or the directory holding it. Empty: ``<checkpoint>/analysis`` or, for a run's ``hf`` export,
    ``<run>/analysis``."""
    per_layer: int = 1
    """Experts of every MoE layer that move into the shared expert (the model must keep top-k routed ones)."""
    pick: str = "driver"
    """``driver`` (causal driver score), ``token`` (most-used: token-selection ratio) or ``gate`` (average gate
    score), pooled over ``domains``."""
    domains: list[str] = field(default_factory=list)
    """The workload whose scores count (token-weighted). Empty: every domain the analysis scored."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    out: str = ""
    """Where the new checkpoint goes (required): a new or empty directory unless ``overwrite``."""
    overwrite: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    """The text: distillation reads its training split, the before/after table its validation split."""
    eval_tokens: int = 32768
    """Held-out tokens per domain for the before/after table; 0: do not measure."""


def run(cfg: ShareConfig, run_dir: Path) -> None:

    from connito.analysis.held_out import held_out_batches
    from connito.cli.before_after import write_before_after_report
    from connito.cli.commands.prune import default_analysis
    from connito.models.families import ModelError
    from connito.retirement.sharing import share_checkpoint  # here, not at the top: `connito --help` stays fast

    missing = [key for key in ("checkpoint", "out") if not getattr(cfg, key)]
    if missing:
        raise ModelError(
            "connito share needs checkpoint=<dir> and out=<dir> (per_layer=<n>, analysis_path=<its analysis.json> "
            f"unless it is <checkpoint>/analysis); missing: {', '.join(missing)}"
        )
    domains = list(cfg.domains or cfg.data.domains)
    calibration = None
    if cfg.distill.steps > 0:
        calibration = held_out_batches(cfg.data, cfg.checkpoint, domains=domains, eval_tokens=cfg.distill.tokens,
                                       split="train").inputs  # fmt: skip
    analysis = cfg.analysis_path or default_analysis(Path(cfg.checkpoint))
    out, plan, mse = share_checkpoint(cfg.checkpoint, analysis, cfg.per_layer, cfg.out, pick=cfg.pick,
                                      domains=list(cfg.domains) or None, calibration=calibration,
                                      distill_steps=cfg.distill.steps, lr=cfg.distill.lr,
                                      overwrite=cfg.overwrite)  # fmt: skip
    picked = {str(layer): experts for layer, experts in plan.picked.items()}
    record = ShareReport(checkpoint=str(Path(cfg.checkpoint).resolve()), pick=cfg.pick, per_layer=cfg.per_layer,
                         shared_from=picked, distillation_mse={str(k): v for k, v in mse.items()})  # fmt: skip
    text = [f"# {cfg.per_layer} expert(s) per MoE layer moved into the shared expert (pick: {cfg.pick})\n",
            "shared from, per layer: " + str(picked)]  # fmt: skip
    if mse:
        text.append("distillation MSE per layer (before -> after): "
                    + ", ".join(f"{k}: {a:.2e} -> {b:.2e}" for k, (a, b) in mse.items()))  # fmt: skip
    write_before_after_report("share", cfg.checkpoint, out, f"shared from {cfg.pick}", record, text, cfg.data,
                              cfg.eval_tokens)  # fmt: skip


COMMAND = Command(
    name="share",
    summary="shared expert from driver experts: merge a layer's drivers into its shared expert, distil, report",
    config_name="share",
    schema=ShareConfig,
    run=run,
)
