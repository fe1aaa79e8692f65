"""The command table: every ``connito <command>`` is one :class:`Command`, found in :mod:`connito.cli.commands`.

A new command is one module in ``connito/cli/commands/`` that defines ``COMMAND`` plus its primary YAML
``configs/<config_name>.yaml`` (whose ``defaults`` list starts with ``connito_<config_name>_schema``). The CLI's
dispatch and usage, the ConfigStore registration and the config tests all read the table; nothing else changes.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any


@dataclass(frozen=True)
class Command:
    """One ``connito`` command: a typed Hydra app around ``run``."""

    name: str
    """What the user types after ``connito``: one word (``"train"``) or several (``"data prepare"``)."""
    summary: str
    """One line for ``connito --help``."""
    config_name: str
    """The primary YAML, ``<config_dir>/<config_name>.yaml``."""
    schema: type
    """The typed root config (a dataclass); registered in ConfigStore as :attr:`schema_name`."""
    run: Callable[[Any, Path], Any]
    """``run(cfg, run_dir)``: ``cfg`` an instance of ``schema``, ``run_dir`` Hydra's output directory. The
    return value goes to Hydra sweepers (``-m``)."""
    config_dir: str | None = None
    """Where the primary YAML lives; None: Connito's ``configs/`` (:func:`connito.cli.paths.config_dir`)."""

    @property
    def words(self) -> tuple[str, ...]:
        return tuple(self.name.split())

    @property
    def schema_name(self) -> str:
        """The ConfigStore name the primary YAML's ``defaults`` list refers to."""
        return f"connito_{self.config_name}_schema"


def discover(package: ModuleType | str = "connito.cli.commands") -> tuple[Command, ...]:
    """Every ``COMMAND`` defined by a module of ``package``, sorted by name."""
    if isinstance(package, str):
        package = importlib.import_module(package)
    commands = []
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        command = getattr(module, "COMMAND", None)
        if not isinstance(command, Command):
            raise TypeError(f"{module.__name__} defines no COMMAND = Command(...); every module there is a command")
        commands.append(command)
    return check_table(commands)


def check_table(commands: Sequence[Command]) -> tuple[Command, ...]:
    """The commands sorted by name; two commands with one name or one config name are an error."""
    for attribute in ("name", "config_name"):
        values = [getattr(command, attribute) for command in commands]
        twice = sorted({value for value in values if values.count(value) > 1})
        if twice:
            raise ValueError(f"two commands share the {attribute} {', '.join(map(repr, twice))}")
    return tuple(sorted(commands, key=lambda command: command.name))


def find(commands: Sequence[Command], args: Sequence[str]) -> tuple[Command, list[str]] | None:
    """The command ``args`` start with (the one with the most words) and the arguments after its name."""
    matches = [command for command in commands if tuple(args[: len(command.words)]) == command.words]
    if not matches:
        return None
    command = max(matches, key=lambda command: len(command.words))
    return command, list(args[len(command.words) :])


def register_schemas(commands: Sequence[Command]) -> None:
    """Store each command's typed root config in Hydra's ConfigStore under :attr:`Command.schema_name`."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for command in commands:
        store.store(name=command.schema_name, node=command.schema)


def hydra_app(command: Command) -> Callable[[], None]:
    """The ``hydra.main`` app of ``command``: compose its config, type it, call ``run`` with the run directory.

    ``DictConfig`` stays here: ``run`` receives the typed dataclass (``OmegaConf.to_object``). A user error
    (:mod:`connito.cli.errors`) raised inside the app ends the process with its one line and exit status 2.
    """
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig, OmegaConf

    from connito.cli.errors import exit_if_user_error
    from connito.cli.inputs import check_paths
    from connito.cli.logs import quiet_libraries
    from connito.cli.paths import config_dir

    register_schemas([command])

    @hydra.main(config_path=command.config_dir or config_dir(), config_name=command.config_name, version_base="1.3")
    def app(cfg: DictConfig) -> Any:
        quiet_libraries()
        from connito.models.custom import register_with_transformers

        register_with_transformers()  # checkpoints of Connito's own model classes load natively in every command
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        started = False
        try:
            typed = OmegaConf.to_object(cfg)
            check_paths(command.name, typed)  # no output into an input, no overwrite of a folder not Connito's
            started = True
            return command.run(typed, run_dir)
        except Exception as err:
            exit_if_user_error(err, command.name, started)
            raise

    return app
