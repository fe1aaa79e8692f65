"""``connito data prepare``: build the corpus, tokenizer and packed sequences into the cache."""

import json
from dataclasses import dataclass, field
from pathlib import Path

from connito.cli.command import Command
from connito.data.config import DataConfig


@dataclass
class DataPrepareConfig:
    """Root config of ``connito data prepare``."""

    data: DataConfig = field(default_factory=DataConfig)


def run(cfg: DataPrepareConfig, run_dir: Path) -> None:
    from connito.data import prepare_data

    prepared = prepare_data(cfg.data)
    summary_file = prepared.root / "summary.json"
    print(f"prepared data in {prepared.root}")
    if summary_file.is_file():
        print(json.dumps(json.loads(summary_file.read_text()), indent=2)[:4000])


COMMAND = Command(
    name="data prepare",
    summary="build the domain-labelled corpus, tokenizer and packed sequences into the cache",
    config_name="data_prepare",
    schema=DataPrepareConfig,
    run=run,
)
