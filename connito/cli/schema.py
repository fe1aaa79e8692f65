"""Register every command's typed root config in Hydra's ConfigStore; the YAML files under configs/ extend them.

Each schema is stored as ``connito_<config_name>_schema`` (:attr:`connito.cli.command.Command.schema_name`), the
first entry of the command's ``defaults`` list. Unknown keys are errors (struct mode), so a typo in an override
stops the job before any work starts. Importing this module registers the schemas of every discovered command
(what ``compose`` outside the CLI, e.g. in tests, needs).
"""

from connito.cli.command import discover, register_schemas


def register() -> None:
    register_schemas(discover())


register()
