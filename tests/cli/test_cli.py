"""The `connito` command as a user runs it: usage, bad input before any training, a Hydra sweep."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from connito.cli.command import discover
from tests.helpers import clean_env, run_cli, small_overrides
from tests.infra import require

HUB_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def installed_script() -> Path:
    """The `connito` console script that `pip install -e .` put next to this interpreter (or on PATH)."""
    beside = Path(sys.executable).parent / "connito"
    if beside.is_file():
        return beside
    found = shutil.which("connito")
    require(None if found else f"no `connito` console script beside {sys.executable} or on PATH: run pip install -e .")
    return Path(found)


def test_the_installed_console_script_lists_every_command_and_composes_train(tmp_path):
    script = installed_script()
    help_ = subprocess.run([script, "--help"], cwd=tmp_path, env=clean_env(), capture_output=True, text=True)
    assert help_.returncode == 0, help_.stderr[-3000:]
    for command in discover():
        assert f"  {command.name} " in help_.stdout and command.summary in help_.stdout, command.name
    job = subprocess.run(
        [script, "train", "--cfg", "job"], cwd=tmp_path, env=clean_env(), capture_output=True, text=True
    )
    assert job.returncode == 0, job.stderr[-3000:]
    assert "ep_size" in job.stdout


def test_no_command_prints_usage_and_fails():
    proc = run_cli([], cwd=".")
    assert proc.returncode == 2
    assert "usage: connito <command>" in proc.stdout


def test_unknown_command_names_itself():
    proc = run_cli(["trian"], cwd=".")
    assert proc.returncode == 2
    assert "connito: unknown command 'trian'" in proc.stderr


def test_a_config_key_that_does_not_exist_stops_the_job_and_names_the_key_meant(tmp_path):
    proc = run_cli(["train", "train.stepz=10"], cwd=tmp_path)
    assert proc.returncode == 2
    assert "connito train: 'train.stepz' is not a Connito option. Did you mean 'train.steps'?" in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_unknown_section_and_free_form_model_keys(tmp_path):
    from connito.cli.overrides import unknown_key_message
    from connito.training.config import ConnitoConfig

    assert "'optimizer' is not a Connito option. Did you mean 'optim'?" in unknown_key_message(
        ConnitoConfig, ["optimizer.lr=1"], "train"
    )
    assert unknown_key_message(ConnitoConfig, ["model.hf_config.rope_theta=1e6", "model=olmoe_tiny"], "train") is None
    assert unknown_key_message(ConnitoConfig, ["hydra.run.dir=x", "+extra=1", "-m"], "train") is None


def test_missing_data_files_stop_before_training(tmp_path):
    missing = tmp_path / "nope.jsonl"
    proc = run_cli(
        [
            "train",
            "data.source=files",
            f"data.files=[{missing}]",
            f"data.cache_dir={tmp_path / 'cache'}",
            "logging.wandb=false",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert proc.stderr == (
        f"connito train: data.files entry '{missing}' matches no file (relative paths resolve against {tmp_path}); "
        "fix the path or remove the entry\n"
    )  # the message alone: no traceback, no Hydra hint
    assert not list((tmp_path / "runs").glob("*/checkpoints"))


def test_model_path_that_is_not_a_checkpoint_stops_with_the_fix(tmp_path):
    proc = run_cli(["train", f"model.path={tmp_path}", "logging.wandb=false"], cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr == (
        f"connito train: model.path='{tmp_path}' is not a Hugging Face checkpoint: it has no config.json. Point "
        "model.path at a directory written by save_pretrained (config.json + *.safetensors).\n"
    )


def test_data_prepare_command(data_cache, tmp_path):
    proc = run_cli(["data", "prepare", *small_overrides(data_cache)[:4]], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"prepared data in {data_cache}" in proc.stdout


@pytest.mark.parametrize(("exported", "offline"), [(None, True), ("0", False)], ids=["default", "user-says-0"])
def test_the_hub_is_offline_for_datasets_unless_the_user_exported_otherwise(data_cache, tmp_path, exported, offline):
    """`datasets` reads HF_HUB_OFFLINE once, on import, and the command modules import it: the default must be in
    the environment before main() discovers the commands, not set later inside the Hydra app."""
    report = (
        "import sys\n"
        "from connito.cli.main import main\n"
        "try:\n"
        "    main(sys.argv[1:])\n"
        "finally:\n"
        "    import datasets, huggingface_hub.constants\n"
        "    print('offline:', datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE)\n"
    )
    env = {k: v for k, v in clean_env().items() if k not in HUB_ENV}
    if exported is not None:
        env["HF_HUB_OFFLINE"] = exported
    proc = subprocess.run(
        [sys.executable, "-c", report, "data", "prepare", *small_overrides(data_cache)[:4]],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"prepared data in {data_cache}" in proc.stdout
    assert f"offline: {offline} {offline}" in proc.stdout


@pytest.mark.slow
def test_multirun_sweep_trains_one_run_per_value(data_cache, tmp_path):
    args = ["train", "-m", "optim.lr=1e-3,3e-3", "train.steps=3", "train.eval_every=0", "train.export=false"]
    proc = run_cli(args + small_overrides(data_cache), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = sorted((tmp_path / "runs").glob("quickstart-sweep/*/summary.json"))
    assert len(summaries) == 2
    assert all(json.loads(p.read_text())["steps"] == 3 for p in summaries)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize(
    ("script", "extra"),
    [
        pytest.param("deepspeed_single_node.sh", [], id="deepspeed"),
        pytest.param("torchrun_single_node.sh", [], id="torchrun"),
        pytest.param("deepspeed_single_node.sh", ["parallel.ep_size=2"], id="deepspeed-ep2"),
    ],
)
def test_launch_scripts_train_on_two_ranks(data_cache, tmp_path, script, extra):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.helpers import REPO, clean_env

    env = clean_env(NPROC="2", MASTER_PORT="29671", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    args = ["train.steps=3", "train.eval_every=0", "train.export=false", *extra, *small_overrides(data_cache)]
    proc = subprocess.run(
        [str(REPO / "launch" / script), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "distributed: world 2" in proc.stdout + proc.stderr
    assert json.loads((tmp_path / "runs" / "quickstart" / "summary.json").read_text())["steps"] == 3
