"""``connito analyze``: routing statistics, domain and driver experts of a model, with a report."""

from pathlib import Path

from connito.analysis.config import AnalyzeConfig
from connito.cli.command import Command


def run(cfg: AnalyzeConfig, run_dir: Path) -> None:
    import os

    from connito.analysis.run import run_analysis  # here, not at the top: `connito --help` stays fast

    all_ranks = int(os.environ.get("WORLD_SIZE", "1")) > 1  # torchrun / the deepspeed launcher: data parallel
    if all_ranks:
        from connito.training.distributed import init_distributed

        if not init_distributed().is_main:
            run_analysis(cfg, all_ranks=True)
            return
    result = run_analysis(cfg, all_ranks=all_ranks)
    print(f"analysis:   {result.out_dir / 'analysis.json'}", f"report:     {result.out_dir / 'report.md'}", sep="\n")


COMMAND = Command(
    name="analyze",
    summary="routing statistics, domain and driver experts of a model; writes analysis.json, report.md, pictures",
    config_name="analyze",
    schema=AnalyzeConfig,
    run=run,
)
