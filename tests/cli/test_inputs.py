"""The inputs/outputs table of every command (connito/cli/inputs.py): every path-like option is classified, and the
overlap rule refuses exactly the outputs that could touch an input."""

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from connito.cli.command import discover
from connito.cli.inputs import INPUTS, NEITHER, OUTPUTS, PathError, check_paths, is_connito_output

PATH_LIKE = re.compile(r"(path|paths|dir|file|files|checkpoint|out|root|base|delta|runs)$")


def leaves(cls, prefix: str = ""):
    """The dotted keys of ``cls``'s string and list-of-string options (what can name a path)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from leaves(hints[f.name], f"{prefix}{f.name}.")
        elif str in (hints[f.name], *typing.get_args(hints[f.name])) or hints[f.name] == list[str]:
            yield f"{prefix}{f.name}"


@pytest.mark.parametrize("command", discover(), ids=lambda command: command.name)
def test_every_path_like_option_is_an_input_an_output_or_said_to_be_neither(command):
    unclassified = [
        key for key in leaves(command.schema)
        if PATH_LIKE.search(key.rsplit(".", 1)[-1]) and key not in INPUTS and key not in OUTPUTS and key not in NEITHER
    ]  # fmt: skip
    assert not unclassified, f"connito {command.name}: classify {unclassified} in connito/cli/inputs.py"


@dataclass
class Probe:
    checkpoint: str = ""
    model_path: str = ""
    data: "ProbeData" = None
    out: str = ""
    out_dir: str = ""
    overwrite: bool = False


@dataclass
class ProbeData:
    files: list[str] = field(default_factory=list)


def test_the_overlap_rule(tmp_path):
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.jsonl").write_text("{}\n")
    data = ProbeData(files=[str(tmp_path / "texts" / "*.jsonl")])
    check_paths("x", Probe(checkpoint=str(checkpoint), data=data, out=str(tmp_path / "new")))
    for out in (checkpoint, checkpoint / "sub", tmp_path, tmp_path / "texts"):
        with pytest.raises(PathError, match="Connito never writes into its inputs"):
            check_paths("x", Probe(checkpoint=str(checkpoint), data=data, out=str(out)))
    # connito analyze writes <checkpoint>/analysis by design; never the checkpoint directory itself
    check_paths("analyze", Probe(model_path=str(checkpoint), out_dir=str(checkpoint / "analysis")))
    with pytest.raises(PathError, match=r"out_dir='.*' is the model \(model_path="):
        check_paths("analyze", Probe(model_path=str(checkpoint), out_dir=str(checkpoint)))


def test_overwrite_replaces_only_what_connito_wrote(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert not is_connito_output(out)
    with pytest.raises(PathError, match="non-empty directory Connito did not write"):
        check_paths("x", Probe(out=str(out), overwrite=True))
    check_paths("x", Probe(out=str(out)))  # without overwrite the writer itself refuses a non-empty out
    (out / "connito_opt_out.json").write_text("{}")
    assert is_connito_output(out)
    check_paths("x", Probe(out=str(out), overwrite=True))
    assert Path(out / "notes.txt").read_text() == "mine"


def test_an_output_that_cannot_be_written_is_refused_before_any_work(tmp_path, monkeypatch):
    import connito.cli.inputs as inputs

    (tmp_path / "a-file").write_text("x")
    with pytest.raises(PathError, match=r"^out='.*': '.*a-file' is a file, not a directory\. Choose an out whose"):
        check_paths("x", Probe(out=str(tmp_path / "a-file" / "deeper" / "out")))
    monkeypatch.setattr(inputs.os, "access", lambda path, mode: Path(path) != tmp_path)  # as a read-only mount
    with pytest.raises(PathError) as refused:
        check_paths("x", Probe(out=str(tmp_path / "new" / "out")))
    assert str(refused.value) == (
        f"out='{tmp_path / 'new' / 'out'}': cannot write in '{tmp_path}' (no permission, or a read-only file "
        f"system). Choose an out in a directory you can write to, or make '{tmp_path}' writable"
    )
