"""Register the typed root configs in Hydra's ConfigStore; the YAML files under configs/ extend them.

Unknown keys are errors (struct mode), so a typo in an override stops the job before any work starts.
"""

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

from connito.data.config import DataConfig
from connito.training.config import ConnitoConfig


@dataclass
class DataPrepareConfig:
    """Root config of ``connito data prepare``."""

    data: DataConfig = field(default_factory=DataConfig)


TRAIN_SCHEMA = "connito_train_schema"
DATA_PREPARE_SCHEMA = "connito_data_prepare_schema"


def register() -> None:
    store = ConfigStore.instance()
    store.store(name=TRAIN_SCHEMA, node=ConnitoConfig)
    store.store(name=DATA_PREPARE_SCHEMA, node=DataPrepareConfig)


register()
