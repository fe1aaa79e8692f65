"""``connito adapt``: fine-tune a base checkpoint to a domain with full fine-tuning, ESFT or DES-MoE."""

from pathlib import Path

from connito.adaptation.config import AdaptConfig
from connito.cli.command import Command


def run(cfg: AdaptConfig, run_dir: Path) -> float | None:
    from connito.adaptation.adapt import run_adapt  # here, not at the top: `connito --help` stays fast

    result = run_adapt(cfg, run_dir)
    if result.outcome is not None:
        print(f"outcome:    {Path(result.train.run_dir) / 'adapt.json'}")
        return result.outcome.forgetting
    return None


COMMAND = Command(
    name="adapt",
    summary="fine-tune a checkpoint to a domain: method=full|esft|des_moe; measures gain, forgetting and cost",
    config_name="adapt",
    schema=AdaptConfig,
    run=run,
)
