"""With no path given, analyze / select / adapt use what `connito quickstart` or `connito train` wrote last."""

import os
from pathlib import Path

import pytest

from connito.adaptation.adapt import check_adapt
from connito.analysis.run import resolve_model_path
from connito.models import ModelError
from connito.models.default_paths import default_analysis, default_checkpoint
from tests.adaptation.test_adapt_command import compose_adapt


def write(path, name: str, mtime: float) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / name).write_text("{}")
    os.utime(path / name, (mtime, mtime))


def test_the_newest_of_what_quickstart_and_train_wrote_is_the_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert str(default_checkpoint()) == "runs/quickstart/hf"  # nothing written yet: the documented default
    with pytest.raises(ModelError, match=r"No model_path given: run `connito quickstart` \(or `connito train`\)"):
        resolve_model_path("")
    write(tmp_path / "runs/lifecycle/base/hf", "config.json", 1000)
    write(tmp_path / "runs/lifecycle/analysis", "analysis.json", 1000)
    assert str(default_checkpoint()) == "runs/lifecycle/base/hf"  # after `connito quickstart` alone
    assert str(default_analysis()) == "runs/lifecycle/analysis"
    assert str(resolve_model_path("")) == "runs/lifecycle/base/hf"
    write(tmp_path / "runs/quickstart/hf", "config.json", 2000)  # then `connito train`
    assert str(default_checkpoint()) == "runs/quickstart/hf"
    write(tmp_path / "runs/lifecycle/base/analysis", "analysis.json", 3000)  # then `connito analyze` of that base
    assert str(default_analysis()) == "runs/lifecycle/base/analysis"


def test_connito_adapt_without_model_path_takes_the_default_base_or_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match=r"No model.path given: run `connito quickstart`"):
        check_adapt(compose_adapt(["method=full"]))
    write(tmp_path / "runs/lifecycle/base/hf", "config.json", 1000)
    cfg = compose_adapt(["method=full"])
    assert check_adapt(cfg) == Path("runs/lifecycle/base/hf")
    assert cfg == compose_adapt(["method=full"]), "the caller's config is not changed (the run builds its own)"
