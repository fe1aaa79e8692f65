"""Bad input as a new user types it: one line naming the fix on stderr (no traceback, no Hydra hint), exit status
2, and nothing lost (every input byte for byte as it was). Bugs keep their traceback; ``--traceback`` and
``CONNITO_TRACEBACK=1`` show it for user errors too. The commands run in-process through ``main`` (as the console
script does) so each test takes well under a second once the libraries are imported."""

import errno
import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest

from connito.cli.command import Command
from connito.cli.errors import EXIT_USER_ERROR, TRACEBACK_ENV
from connito.cli.logs import LIBRARY_ENV_DEFAULTS
from connito.cli.main import main
from connito.models.families import ModelError, known_families
from tests.cli.test_command import ProbeConfig, probe_command
from tests.experts.conftest import build_tiny


@pytest.fixture
def cli_state(monkeypatch):
    """main() sets sys.argv, library defaults, HYDRA_FULL_ERROR and (with --traceback) CONNITO_TRACEBACK: undo."""
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    for name in (*LIBRARY_ENV_DEFAULTS, "LOCAL_RANK", "HYDRA_FULL_ERROR", TRACEBACK_ENV):
        monkeypatch.setenv(name, "placeholder")
        monkeypatch.delenv(name)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "ckpt"
    build_tiny("qwen3_moe").save_pretrained(path)
    return path


def digest(*roots: Path) -> dict[str, str]:
    """sha256 of every file under ``roots`` (files or directories): what 'nothing lost' compares."""
    files = [p for root in roots for p in ([root] if root.is_file() else sorted(root.rglob("*"))) if p.is_file()]
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def refused(capsys, args: list[str], commands=None) -> str:
    """Run ``connito <args>``; it must exit with status 2 having printed exactly one line to stderr: that line."""
    with pytest.raises(SystemExit) as exited:
        main(args, commands)
    assert exited.value.code == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert "Traceback" not in err and "HYDRA_FULL_ERROR" not in err
    return err.rstrip("\n")


def raising(error: BaseException):
    def run(cfg, run_dir):
        raise error

    return run


def probe(tmp_path: Path, run) -> list[Command]:
    command = probe_command(tmp_path, [])
    return [Command(command.name, command.summary, command.config_name, ProbeConfig, run, command.config_dir)]


# -- what a user error is -----------------------------------------------------------------------------------------


def test_a_user_error_is_one_line_with_exit_status_2(cli_state, tmp_path, capsys):
    commands = probe(tmp_path, raising(ModelError("checkpoint='x' has no config.json. Point checkpoint at one")))
    line = refused(capsys, ["probe", "it"], commands)
    assert line == "connito probe it: checkpoint='x' has no config.json. Point checkpoint at one"


def test_a_valueerror_raised_by_connito_is_a_user_error_one_raised_in_a_library_is_a_bug(cli_state, tmp_path, capsys):
    from connito.training.time_slice import parse_duration

    line = refused(capsys, ["probe", "it"], probe(tmp_path, lambda cfg, run_dir: parse_duration("soon")))
    assert line.startswith("connito probe it: ") and "soon" in line
    with pytest.raises(ValueError, match="invalid literal for int"):
        main(["probe", "it"], probe(tmp_path, lambda cfg, run_dir: int("soon")))  # a bug: its traceback stays


def test_a_bug_keeps_its_traceback_and_the_flag_shows_it_for_user_errors(cli_state, tmp_path, monkeypatch):
    with pytest.raises(KeyError):
        main(["probe", "it"], probe(tmp_path, raising(KeyError("internal"))))
    commands = probe(tmp_path, raising(ModelError("bad input")))
    with pytest.raises(ModelError, match="bad input"):
        main(["probe", "it", "--traceback"], commands)
    monkeypatch.delenv(TRACEBACK_ENV)
    monkeypatch.setenv(TRACEBACK_ENV, "1")
    with pytest.raises(ModelError, match="bad input"):
        main(["probe", "it"], commands)


def test_a_value_of_the_wrong_type_is_one_line_without_hydras_hint(cli_state, tmp_path, capsys):
    line = refused(capsys, ["probe", "it", "times=abc"], probe(tmp_path, raising(AssertionError("never runs"))))
    assert line == (
        "connito probe it: Error merging override times=abc; Value 'abc' of type 'str' could not be converted to "
        "Integer. `connito probe it --cfg job` prints every option with its value"
    )


def test_a_path_that_cannot_be_written_is_named_with_the_fix(cli_state, tmp_path, capsys):
    error = OSError(errno.EROFS, "Read-only file system", "/mnt/ro/out")
    line = refused(capsys, ["probe", "it"], probe(tmp_path, raising(error)))
    assert line == (
        "connito probe it: '/mnt/ro/out': Read-only file system; it is on a read-only file system: choose a path on "
        "a writable one"
    )


def test_a_misspelt_group_suggests_the_option_of_that_name_in_any_group():
    from connito.cli.overrides import unknown_key_message
    from connito.training.config import ConnitoConfig

    assert unknown_key_message(ConnitoConfig, ["engine.ep_size=2"], "train") == (
        "connito train: 'engine.ep_size' is not a Connito option. Did you mean 'parallel.ep_size'? "
        "`connito train --cfg job` prints every option with its value."
    )


# -- never writes into its inputs; never replaces a folder it did not write ----------------------------------------


def test_select_refuses_to_write_its_mask_over_its_own_analysis(cli_state, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    analysis = tmp_path / "analysis" / "analysis.json"
    analysis.parent.mkdir()
    analysis.write_text(json.dumps({"schema": "connito.analysis/1", "anything": [1, 2, 3]}))
    before = digest(tmp_path)
    line = refused(capsys, ["select", "analysis_path=analysis/analysis.json", "domains=[code]", f"out={analysis}"])
    assert line == (
        f"connito select: out='{analysis}' is the analysis (analysis_path='analysis/analysis.json'): Connito never "
        "writes into its inputs. Choose a new out"
    )
    line = refused(capsys, ["select", "analysis_path=analysis", "domains=[code]", "out=analysis"])
    assert line == (
        "connito select: out='analysis' holds the analysis (analysis_path='analysis'): Connito never writes into its "
        f"inputs. Choose an out that does not contain '{analysis}'"
    )
    assert digest(tmp_path) == before


def test_prune_refuses_an_out_that_is_its_analysis_even_with_overwrite(cli_state, tiny_checkpoint, tmp_path, capsys):
    analysis = tmp_path / "A"
    analysis.mkdir()
    (analysis / "analysis.json").write_text('{"schema": "connito.analysis/1"}')
    before = digest(analysis, tiny_checkpoint)
    args = [f"checkpoint={tiny_checkpoint}", f"analysis_path={analysis}", "keep=2", f"out={analysis}"]
    line = refused(capsys, ["prune", *args, "overwrite=true"])
    assert line == (
        f"connito prune: out='{analysis}' holds the analysis (analysis_path='{analysis}'): Connito never writes into "
        f"its inputs. Choose an out that does not contain '{analysis / 'analysis.json'}'"
    )
    line = refused(capsys, ["prune", f"checkpoint={tiny_checkpoint}", "keep=2", f"out={tiny_checkpoint / 'pruned'}"])
    assert line == (
        f"connito prune: out='{tiny_checkpoint / 'pruned'}' is inside the checkpoint (checkpoint='{tiny_checkpoint}'): "
        f"Connito never writes into its inputs. Choose an out outside '{tiny_checkpoint}'"
    )
    assert digest(analysis, tiny_checkpoint) == before


def test_overwrite_refuses_a_folder_connito_did_not_write(cli_state, tiny_checkpoint, tmp_path, capsys):
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "chapter1.tex").write_text("my only copy")
    before = digest(mine, tiny_checkpoint)
    line = refused(capsys, ["remove", f"checkpoint={tiny_checkpoint}", "experts=['*:3']", f"out={mine}",
                            "overwrite=true"])  # fmt: skip
    assert line == (
        f"connito remove: out='{mine}' is a non-empty directory Connito did not write (no connito_*.json, "
        "manifest.json or analysis.json in it), and overwrite=true would replace it whole. Choose a new out, or "
        "empty or delete that directory yourself"
    )
    assert digest(mine, tiny_checkpoint) == before


# -- raw library errors become one line naming the file -------------------------------------------------------------


def test_a_truncated_safetensors_file_is_named(cli_state, tiny_checkpoint, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    weights = broken / "model.safetensors"
    size = weights.stat().st_size
    with weights.open("r+b") as f:
        f.truncate(size // 2)
    before = digest(broken)
    line = refused(capsys, ["remove", f"checkpoint={broken}", "experts=['*:3']", f"out={tmp_path / 'out'}"])
    assert line == (
        f"connito remove: '{weights}' is not a complete safetensors file (its tensors need {size} bytes but the file "
        f"has {size // 2}: it is truncated); it was not written or copied completely. Copy it again from its source, "
        "or save the checkpoint again with save_pretrained"
    )
    assert digest(broken) == before and not (tmp_path / "out").exists()


def test_an_unknown_model_type_lists_the_supported_families(cli_state, tiny_checkpoint, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(tiny_checkpoint, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "mystery_moe"}))
    line = refused(capsys, ["analyze", f"model_path={other}", f"out_dir={tmp_path / 'analysis'}"])
    assert line == (
        f"connito analyze: model_path='{other}' is a 'mystery_moe' model, not a family Connito supports: "
        f"{', '.join(known_families())}. Point model_path at a checkpoint of one of them, or register the family "
        "with connito.models.register_family (if it is newer than your transformers, upgrading transformers may "
        "also be needed)"
    )
    assert "qwen3_moe" in line and not (tmp_path / "analysis").exists()


def test_keep_0_names_the_value_and_the_allowed_range(cli_state, tiny_checkpoint, tmp_path, capsys):
    line = refused(capsys, ["prune", f"checkpoint={tiny_checkpoint}", "keep=0", f"out={tmp_path / 'out'}"])
    assert line == (
        "connito prune: keep=0 is not a number of experts to keep: give keep between the model's top-k (2) and 7 "
        "(it has 8 experts per MoE layer)"
    )
    line = refused(capsys, ["prune", f"checkpoint={tiny_checkpoint}", f"out={tmp_path / 'out'}"])
    assert line.endswith("missing: keep")
    assert not (tmp_path / "out").exists()


def test_remove_with_uneven_layers_shows_the_command_line_form(cli_state, tiny_checkpoint, tmp_path, capsys):
    line = refused(capsys, ["remove", f"checkpoint={tiny_checkpoint}", "experts=[0:3]", f"out={tmp_path / 'out'}"])
    assert line == (
        "connito remove: experts=['0:3'] removes different numbers of experts from the MoE layers (layer 0: 1, "
        "layer 1: 0, layer 2: 0); a checkpoint has one expert count for every layer, so remove as many from each, "
        "e.g. 'experts=[0:3,1:3,2:3]' or 'experts=[*:3]' (that expert of every MoE layer)"
    )
    assert "in_every_layer" not in line and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        pytest.param(
            "notes.jsonl",
            b'{"text": "fine", "domain": "a"}\n{"text": "caf\xe9", "domain": "a"}\n',
            "'{path}' line 2 column 14: byte 0xe9 is not UTF-8 text. Save the file as UTF-8 (e.g. iconv -f latin1 -t "
            "utf-8 'notes.jsonl' > fixed.jsonl), or remove it from data.files",
            id="latin1-jsonl",
        ),
        pytest.param(
            "rows.jsonl",
            b'{"text": "fine", "domain": "a"}\n{"text": "x", "domain": "a",}\n',
            "'{path}' is not valid JSON at line 2 column 29 (Expecting property name enclosed in double quotes). Fix "
            "it (one JSON object per line), or remove the file from data.files",
            id="bad-jsonl",
        ),
        pytest.param(
            "rows.json",
            b'[\n  {"text": "fine", "domain": "a"},\n  {"text": "x" "domain": "a"}\n]\n',
            "'{path}' is not valid JSON at line 3 column 16 (Expecting ',' delimiter). Fix it (one JSON document or "
            "one object per line), or remove the file from data.files",
            id="bad-json-document",
        ),
    ],
)
def test_a_data_file_that_is_not_utf8_or_json_is_named_with_line_and_column(
    cli_state, tmp_path, capsys, name, content, message
):
    path = tmp_path / name
    path.write_bytes(content)
    args = ["data", "prepare", "data.source=files", f"data.files=[{path}]", f"data.cache_dir={tmp_path / 'cache'}"]
    line = refused(capsys, args)
    assert line == "connito data prepare: " + message.format(path=path.resolve())
    assert path.read_bytes() == content


def test_a_config_group_option_that_does_not_exist_lists_those_that_do(cli_state, capsys):
    from connito.cli.paths import config_dir

    options = sorted(path.stem for path in (Path(config_dir()) / "model").glob("*.yaml"))
    line = refused(capsys, ["train", "model=nonexistent"])
    assert line == (
        "connito train: In 'train': Could not find 'model/nonexistent'; the options of 'model' are "
        + ", ".join(options)
    )


def test_a_missing_file_connito_names_itself_is_one_line(cli_state, tmp_path, capsys):
    line = refused(capsys, ["adapt", "report", f"runs=[{tmp_path / 'nope'}]"])
    assert line == (
        f"connito adapt report: no adapt.json at {tmp_path / 'nope'}: is it a finished `connito adapt` run directory?"
    )
