"""``connito data prepare``: build the corpus, tokenizer and packed sequences into the cache."""

import json
import logging

import hydra
from omegaconf import DictConfig, OmegaConf

from connito.cli import schema  # noqa: F401  (registers the typed configs)
from connito.cli.logs import quiet_libraries
from connito.cli.paths import config_dir

log = logging.getLogger("connito")


@hydra.main(config_path=config_dir(), config_name="data_prepare", version_base="1.3")
def data_prepare_app(cfg: DictConfig) -> None:
    quiet_libraries()
    from connito.data import prepare_data

    prepared = prepare_data(OmegaConf.to_object(cfg).data)
    summary_file = prepared.root / "summary.json"
    print(f"prepared data in {prepared.root}")
    if summary_file.is_file():
        print(json.dumps(json.loads(summary_file.read_text()), indent=2)[:4000])
