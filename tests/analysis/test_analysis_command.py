"""`connito analyze` end to end on a briefly trained tiny model: the files it writes, what they say, and the
refusals before any work."""

import json

import pytest
import torch

from connito.analysis.config import AnalyzeConfig, DriversConfig, ReweightingConfig
from connito.analysis.run import run_analysis
from connito.models import ModelError
from connito.models.fingerprint import checkpoint_fingerprint
from connito.training.trainer import run_training
from tests.helpers import compose_train, run_cli, small_overrides


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_cache):
    run_dir = tmp_path_factory.mktemp("analyze") / "run"
    overrides = small_overrides(data_cache) + ["train.steps=20", "train.eval_every=0", "train.checkpoint_every=0"]
    cfg = compose_train(overrides)
    run_training(cfg, run_dir)
    return run_dir, cfg.data


def analyze(run_dir, data, out, **options) -> dict:
    options.setdefault("drivers", DriversConfig(tokens=1024))
    cfg = AnalyzeConfig(model_path=str(run_dir), data=data, out_dir=str(out), tokens=2048, progress=False, **options)
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


def test_sufficiency_and_reweighting_sections(trained, tmp_path):
    run_dir, data = trained
    record = analyze(run_dir, data, tmp_path / "out", min_tokens=10, drivers=DriversConfig(tokens=1024),
                     reweighting=ReweightingConfig(enabled=True, factor=2.0, drivers_per_domain=2))  # fmt: skip
    domains = record["data"]["domains"]
    suff = record["sufficiency"]
    measured = [d for d in domains if suff["tokens"][d] > 0]
    assert measured and all(0 <= suff["agreement"][d] <= 1 for d in measured)
    assert all(suff["loss_top1"][d] != suff["loss_full"][d] for d in measured)  # top-2 model: top-1 changes it
    rw = record["reweighting"]
    for d in measured:
        assert 1 <= len(rw["boosted"][d]) and set(rw["loss_under"][d]) == set(domains)
        assert rw["loss_under"][d][d] != rw["loss"][d]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Single-expert sufficiency" in report and "## Reweighting" in report


def test_a_folded_export_the_family_cannot_give_is_refused_before_any_work(trained, tmp_path):
    run_dir, data = trained  # qwen3_moe_tiny renormalises its top-k weights (norm_topk_prob: true)
    cfg = AnalyzeConfig(model_path=str(run_dir), data=data, out_dir=str(tmp_path / "out"), progress=False)
    cfg.reweighting = ReweightingConfig(enabled=True, export=True)
    with pytest.raises(ValueError, match="reweighting.export=true cannot be written.*renormalises its top-k"):
        run_analysis(cfg)
    assert not (tmp_path / "out").exists()


def test_reweighting_drivers_without_the_scan_is_refused(trained, tmp_path):
    run_dir, data = trained
    cfg = AnalyzeConfig(model_path=str(run_dir), data=data, out_dir=str(tmp_path / "out"), progress=False)
    cfg.drivers.enabled = False
    cfg.reweighting.enabled = True
    with pytest.raises(ValueError, match=r"targets includes 'drivers' but drivers.enabled=false"):
        run_analysis(cfg)


def test_connito_train_writes_the_report_of_its_final_model(data_cache, tmp_path):
    overrides = [o for o in small_overrides(data_cache) if o != "analysis=none"]
    proc = run_cli(
        ["train", *overrides, "train.steps=4", "train.eval_every=0", "train.checkpoint_every=0",
         "analysis.tokens=1024", "analysis.drivers.tokens=256", "analysis.progress=false"],
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "runs" / "quickstart" / "analysis"
    record = json.loads((out / "analysis.json").read_text())
    assert record["model"]["fingerprint"] == checkpoint_fingerprint(tmp_path / "runs" / "quickstart" / "hf")
    assert "## Driver experts" in (out / "report.md").read_text()
    assert f"analysis:   {out / 'report.md'}" in proc.stdout


@pytest.mark.slow
@pytest.mark.distributed
def test_analyze_under_torchrun_equals_one_process(trained, tmp_path, data_cache):
    """2 gloo ranks, each streaming every other row: the same analysis.json as one process (sums in another
    order: equal to the 6 digits the file keeps, up to one unit of the last)."""
    import subprocess
    import sys

    from tests.helpers import REPO, clean_env, free_port

    run_dir, data = trained
    options = ["tokens=2048", "drivers.tokens=1024", "min_tokens=10", "progress=false", "reweighting.enabled=true"]
    data_keys = [o for o in small_overrides(data_cache) if o.startswith("data.")]
    args = ["analyze", f"model_path={run_dir}", *data_keys, *options]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "-m", "connito", *args, f"out_dir={tmp_path / 'two'}"]  # fmt: skip
    proc = subprocess.run(command, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = analyze(run_dir, data, tmp_path / "one", min_tokens=10, reweighting=ReweightingConfig(enabled=True))
    two = json.loads((tmp_path / "two" / "analysis.json").read_text())
    assert two["data"] == one["data"] and two["domain_experts"] == one["domain_experts"]
    assert two["concentration"] == one["concentration"] and two["topk_overlap"]["sets"] == one["topk_overlap"]["sets"]
    assert two["reweighting"]["boosted"] == one["reweighting"]["boosted"]

    def numbers(record):
        values = []

        def walk(node):
            if isinstance(node, dict):
                for key in sorted(node):
                    if key not in ("path", "exports"):
                        walk(node[key])
            elif isinstance(node, list):
                for item in node:
                    walk(item)
            elif isinstance(node, float):
                values.append(node)

        walk(record)
        return torch.tensor(values, dtype=torch.float64)

    torch.testing.assert_close(numbers(two), numbers(one), rtol=0, atol=2e-6)
