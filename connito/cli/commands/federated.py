"""``connito federated``: FFT-MoE as jobs (local processes, torchrun, or SLURM arrays): sparse MoE adapters on a
frozen base, clients with their own data and budgets training them round after round, the server averaging each
expert over the clients that trained it; see :mod:`connito.orchestration.federated`."""

from pathlib import Path

from connito.cli.command import Command
from connito.orchestration.federated import FederatedConfig


def run(cfg: FederatedConfig, run_dir: Path) -> None:
    from connito.cli.pipelines import run_pipeline_command
    from connito.orchestration.federated import REPORT, plan_federated, run_aggregate, run_export, run_init

    def aggregate(root: Path) -> None:
        if cfg.round_index < 0:
            raise ValueError("stage=aggregate aggregates one round's updates: give round_index=<round>")
        run_aggregate(root, cfg.round_index)

    stages = {
        "init": lambda root: print(f"global adapters: {run_init(root)}"),
        "aggregate": aggregate,
        "export": lambda root: run_export(root),
    }
    run_pipeline_command("federated", cfg, plan_federated, stages, f"{REPORT}.md")


COMMAND = Command(
    name="federated",
    summary="FFT-MoE: clients with their own data and budgets train sparse MoE adapters on a frozen base, in rounds",
    config_name="federated",
    schema=FederatedConfig,
    run=run,
)
