"""`connito analyze` end to end on a briefly trained tiny model: the files it writes, what they say, and the
refusals before any work."""

import json

import pytest
import torch

from connito.analysis.config import AnalyzeConfig
from connito.analysis.run import run_analysis
from connito.models import ModelError
from connito.models.fingerprint import checkpoint_fingerprint
from connito.training.trainer import run_training
from tests.helpers import compose_train, small_overrides


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_cache):
    run_dir = tmp_path_factory.mktemp("analyze") / "run"
    overrides = small_overrides(data_cache) + ["train.steps=20", "train.eval_every=0", "train.checkpoint_every=0"]
    cfg = compose_train(overrides)
    run_training(cfg, run_dir)
    return run_dir, cfg.data


def analyze(run_dir, data, out, **options) -> dict:
    cfg = AnalyzeConfig(model_path=str(run_dir), data=data, out_dir=str(out), tokens=2048, progress=False, **options)
    cfg.drivers.tokens = 1024
    run_analysis(cfg)
    return json.loads((out / "analysis.json").read_text())


def test_analyze_writes_the_schema_the_pictures_and_the_report(trained, tmp_path):
    run_dir, data = trained
    record = analyze(run_dir, data, tmp_path / "out", min_tokens=10)
    assert record["schema"] == "connito.analysis/1"
    assert record["model"]["fingerprint"] == checkpoint_fingerprint(run_dir / "hf")
    assert record["model"]["moe_layers"] == [0, 1, 2, 3] and record["model"]["num_experts"] == 8
    domains = record["data"]["domains"]
    assert domains == ["code", "docs", "prose", "wiki"] and sum(record["data"]["tokens"].values()) > 1500
    for name in ("gate_score", "selection_ratio"):  # ESFT's scores sum to 1 within every layer
        sums = torch.tensor([record["esft"][name][d] for d in domains]).sum(dim=-1)
        torch.testing.assert_close(sums, torch.ones_like(sums), rtol=0, atol=1e-5)
    needed = torch.tensor([record["concentration"]["experts_needed"][d] for d in domains])
    assert (needed[..., 0] <= needed[..., 1]).all() and (needed[..., 1] <= needed[..., 2]).all()
    nan = float("nan")
    score = torch.tensor(
        [[[nan if v is None else v for v in row] for row in record["drivers"]["score"][d]] for d in domains]
    )
    assert score.shape == (4, 4, 8) and score.nan_to_num().abs().max() > 0
    scanned = [d for d in domains if record["drivers"]["tokens"][d] > 0]
    assert scanned and all(not score[domains.index(d)].isnan().any() for d in scanned)
    for picture in ("utilisation", "concentration", "coactivation", "overlap", "drivers"):
        assert (tmp_path / "out" / f"{picture}.png").read_bytes()[:4] == b"\x89PNG"
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Driver experts" in report and "![utilisation](utilisation.png)" in report
    assert all(f"| {d} |" in report for d in domains)


def test_a_bad_perturbation_factor_stops_before_any_work(trained, tmp_path):
    run_dir, data = trained
    cfg = AnalyzeConfig(model_path=str(run_dir), data=data, out_dir=str(tmp_path / "out"), progress=False)
    cfg.drivers.factor_down = 1.5
    with pytest.raises(ValueError, match=r"factor_down must be in \[0, 1\)"):
        run_analysis(cfg)
    assert not (tmp_path / "out").exists()


def test_a_missing_model_names_the_fix(tmp_path):
    with pytest.raises(ModelError, match="neither a save_pretrained checkpoint nor a connito run directory"):
        run_analysis(AnalyzeConfig(model_path=str(tmp_path / "nothing"), progress=False))


def test_the_fingerprint_changes_with_any_weight(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    run_dir, _ = trained
    model = AutoModelForCausalLM.from_pretrained(run_dir / "hf")
    model.save_pretrained(tmp_path / "same")
    assert checkpoint_fingerprint(tmp_path / "same") == checkpoint_fingerprint(run_dir / "hf")
    with torch.no_grad():
        model.model.layers[1].mlp.experts.down_proj[3, 0, 0] += 1e-3
    model.save_pretrained(tmp_path / "changed")
    assert checkpoint_fingerprint(tmp_path / "changed") != checkpoint_fingerprint(run_dir / "hf")
