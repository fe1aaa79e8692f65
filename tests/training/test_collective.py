"""One-rank conversions: done once, and a failure keeps its cause."""

import traceback

import pytest

from connito.training.collective import convert_once_on_main


def failing_conversion() -> None:
    raise KeyError("a tensor the conversion needed")


def test_a_failed_conversion_is_raised_as_itself_with_its_traceback(tmp_path):
    with pytest.raises(KeyError, match="a tensor the conversion needed") as err:
        convert_once_on_main(tmp_path / "DONE", failing_conversion, "converting", is_main=True)
    frames = [frame.name for frame in traceback.extract_tb(err.value.__traceback__)]
    assert frames[-1] == "failing_conversion"


def test_a_finished_conversion_is_not_run_again(tmp_path):
    calls = []
    (tmp_path / "DONE").write_text("")
    convert_once_on_main(tmp_path / "DONE", lambda: calls.append(1), "converting", is_main=True)
    assert calls == []
    convert_once_on_main(tmp_path / "OTHER", lambda: calls.append(1), "converting", is_main=True)
    assert calls == [1]
