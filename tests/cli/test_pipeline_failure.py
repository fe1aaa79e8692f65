"""A pipeline whose job fails (connito quickstart / btx / flexolmo / groups / federated) ends in its message alone:
which job, its reason and log, how to run only the unfinished jobs; exit status 1, no Python traceback (it is not
bad input, and not a bug in Connito). --traceback shows the traceback."""

import os
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from connito.cli.command import Command
from connito.cli.errors import EXIT_FAILURE
from connito.cli.logs import LIBRARY_ENV_DEFAULTS
from connito.cli.main import main
from connito.orchestration import Job, LauncherConfig, PipelineStopped, Plan, Stage, run_pipeline

FAILING_JOB = "import sys; print('failing on purpose'); sys.exit(3)\n"


@dataclass
class PipeConfig:
    root: str = ""


@pytest.fixture
def cli_state(monkeypatch):
    """main() sets sys.argv, the library environment defaults, LOCAL_RANK and CONNITO_TRACEBACK: undo all."""
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    for name in (*LIBRARY_ENV_DEFAULTS, "LOCAL_RANK", "HYDRA_FULL_ERROR", "CONNITO_TRACEBACK"):
        monkeypatch.setenv(name, "placeholder")
        monkeypatch.delenv(name)


def pipeline_command(tmp_path: Path, monkeypatch) -> tuple[Command, Path]:
    """``connito pipe it``: a one-job pipeline whose job exits with status 3."""
    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / "failingjob.py").write_text(FAILING_JOB)
    monkeypatch.setenv("PYTHONPATH", f"{modules}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    (tmp_path / "pipe.yaml").write_text(
        textwrap.dedent(f"""\
            defaults:
              - connito_pipe_schema
              - override hydra/job_logging: none
              - override hydra/hydra_logging: none
              - _self_
            hydra:
              output_subdir: null
              run:
                dir: {tmp_path / "hydra"}
            """)
    )
    root = tmp_path / "run"

    def run(cfg, run_dir):
        root.mkdir(exist_ok=True)
        train = Job("train-code", (str(root / "out.txt"),), (str(root / "out.txt"),), module="failingjob")
        run_pipeline(root, Plan("quickstart", (Stage("train", (train,)),), {"x": 1}), LauncherConfig())

    command = Command(name="pipe it", summary="a failing pipeline", config_name="pipe", schema=PipeConfig, run=run,
                      config_dir=str(tmp_path))  # fmt: skip
    return command, root


def test_a_failed_job_ends_the_pipeline_in_its_message_alone_with_exit_status_1(tmp_path, monkeypatch, capsys,
                                                                                  cli_state):  # fmt: skip
    command, root = pipeline_command(tmp_path, monkeypatch)
    with pytest.raises(SystemExit) as exited:
        main(["pipe", "it"], commands=[command])
    assert exited.value.code == EXIT_FAILURE == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "HYDRA_FULL_ERROR" not in err
    lines = err.splitlines()
    first = lines.index(f"connito pipe it: the pipeline in {root} stopped: 1 job(s) did not finish")
    assert lines[first + 1 : first + 3] == [
        f"  train-code: failed: exit code 3; see {root / 'logs' / 'train-code.log'}",
        "The finished jobs are kept; nothing was merged. Fix the cause (see the log) and run the same "
        "`connito quickstart` command again: only these jobs (and the stages after them) run.",
    ]
    assert "train-code" in lines[-2] + lines[-1]  # then the status table
    assert "failing on purpose" in (root / "logs" / "train-code.log").read_text()


def test_with_traceback_the_failure_propagates(tmp_path, monkeypatch, cli_state):
    command, root = pipeline_command(tmp_path, monkeypatch)
    with pytest.raises(PipelineStopped, match=r"train-code: failed: exit code 3"):
        main(["pipe", "it", "--traceback"], commands=[command])
