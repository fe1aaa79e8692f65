"""``connito select``: choose the experts a domain needs from an analysis.json; write an expert-mask file."""

from pathlib import Path

from connito.adaptation.config import SelectConfig
from connito.cli.command import Command


def run(cfg: SelectConfig, run_dir: Path) -> None:
    from connito.adaptation.run import run_select, summary_text  # here, not at the top: `connito --help` stays fast

    mask_file = run_select(cfg)
    print(f"mask file:  {mask_file.path}", summary_text(mask_file), sep="\n")


COMMAND = Command(
    name="select",
    summary="choose experts for a domain from analysis.json (ESFT gate/token score, drivers, or a list); "
    "writes an expert-mask file",
    config_name="select",
    schema=SelectConfig,
    run=run,
)
