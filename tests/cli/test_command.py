"""The command table: a module in the commands package is a command; usage and dispatch follow with no other edit."""

import os
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from connito.cli.command import Command, check_table, discover, find
from connito.cli.logs import LIBRARY_ENV_DEFAULTS
from connito.cli.main import main


@dataclass
class ProbeConfig:
    word: str = "hello"
    times: int = 1


def probe_command(config_dir: Path, calls: list) -> Command:
    """A throw-away two-word command with its own primary YAML in ``config_dir``."""
    (config_dir / "probe.yaml").write_text(
        textwrap.dedent(f"""\
            defaults:
              - connito_probe_schema
              - override hydra/job_logging: none
              - override hydra/hydra_logging: none
              - _self_
            word: from-yaml
            hydra:
              output_subdir: null
              run:
                dir: {config_dir / "run"}
            """)
    )
    return Command(
        name="probe it",
        summary="a command that only this test knows",
        config_name="probe",
        schema=ProbeConfig,
        run=lambda cfg, run_dir: calls.append((cfg, run_dir)),
        config_dir=str(config_dir),
    )


@pytest.fixture
def cli_state(monkeypatch):
    """main() sets sys.argv, the library environment defaults and LOCAL_RANK: undo all after the test."""
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    for name in (*LIBRARY_ENV_DEFAULTS, "LOCAL_RANK", "HYDRA_FULL_ERROR"):
        monkeypatch.setenv(name, "placeholder")  # records the original value (or its absence) for undo ...
        monkeypatch.delenv(name)  # ... then leaves it unset, as in a fresh shell


def test_the_table_holds_train_and_data_prepare_under_the_schema_names_the_yaml_uses():
    commands = {command.name: command for command in discover()}
    assert {"train", "data prepare"} <= set(commands)
    assert commands["train"].schema_name == "connito_train_schema"
    assert commands["data prepare"].schema_name == "connito_data_prepare_schema"


def test_a_module_in_the_commands_package_is_discovered(tmp_path, monkeypatch):
    package = tmp_path / "more_commands"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "probe.py").write_text(
        textwrap.dedent("""\
            from connito.cli.command import Command
            COMMAND = Command(name="probe", summary="s", config_name="probe", schema=dict, run=print)
            """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert [command.name for command in discover("more_commands")] == ["probe"]

    (package / "stray.py").write_text("X = 1\n")
    with pytest.raises(TypeError, match="more_commands.stray defines no COMMAND"):
        discover("more_commands")


def test_two_commands_with_one_name_are_refused(tmp_path):
    probe = probe_command(tmp_path, [])
    with pytest.raises(ValueError, match="two commands share the name 'probe it'"):
        check_table([probe, probe])


def test_dispatch_picks_the_command_with_the_most_words(tmp_path):
    probe = probe_command(tmp_path, [])
    shorter = Command(name="probe", summary="s", config_name="p", schema=ProbeConfig, run=print)
    assert find([shorter, probe], ["probe", "it", "times=2"]) == (probe, ["times=2"])
    assert find([shorter, probe], ["probe", "times=2"]) == (shorter, ["times=2"])
    assert find([shorter, probe], ["prob"]) is None


def test_a_new_command_appears_in_usage_and_runs_with_its_typed_config(tmp_path, capsys, cli_state):
    calls: list = []
    table = [*discover(), probe_command(tmp_path, calls)]

    with pytest.raises(SystemExit) as exit_:
        main(["--help"], commands=table)
    assert exit_.value.code == 0
    usage = capsys.readouterr().out
    for command in table:
        assert f"  {command.name} " in usage and command.summary in usage

    main(["probe", "it", "times=3", "--local_rank=5"], commands=table)
    assert calls == [(ProbeConfig(word="from-yaml", times=3), tmp_path / "run")]
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # set by main() before the command ran
    assert os.environ["LOCAL_RANK"] == "5"  # the deepspeed launcher's flag, kept out of Hydra

    with pytest.raises(SystemExit) as exit_:
        main(["probe", "it", "tims=3"], commands=table)
    assert exit_.value.code == 2  # a user error
    assert "connito probe it: 'tims' is not a Connito option. Did you mean 'times'?" in capsys.readouterr().err
    assert len(calls) == 1


def test_an_unknown_subcommand_is_named_with_all_its_words(capsys, cli_state):
    with pytest.raises(SystemExit) as exit_:
        main(["data", "prepaer", "data.seed=1"])
    assert exit_.value.code == 2
    assert "connito: unknown command 'data prepaer'" in capsys.readouterr().err
