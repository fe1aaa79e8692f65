"""``connito quickstart``: the lifecycle plan (train, analyze, select, ESFT + prune side by side, report), the
options it refuses, the guard against a job whose workdir would swallow the pipeline, and (slow) the whole
lifecycle on small data: one report with every model's held-out loss, a pruned checkpoint of the size asked for,
the opted-out experts the ones the analysis ranks first."""

import json

import pytest
from transformers import AutoConfig

from connito.orchestration import OrchestrationError
from connito.orchestration.jobs import Job, Stage
from connito.orchestration.plan import Plan, write_plan
from connito.orchestration.quickstart import QuickstartConfig, most_used_experts, plan_quickstart
from tests.orchestration import pipelines

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def config(tmp_path, **changes) -> QuickstartConfig:
    return pipelines.config(QuickstartConfig, tmp_path, "lifecycle", **changes)


def test_the_plan_trains_analyzes_selects_then_adapts_and_prunes_side_by_side_then_reports(tmp_path):
    root = tmp_path / "lifecycle"
    plan = plan_quickstart(config(tmp_path))
    assert [s.name for s in plan.stages] == ["base", "analyze", "select", "retire", "report"]
    assert [j.name for j in plan.stages[3].jobs] == ["adapt", "prune"]
    base = plan.job("base").command
    assert base[0] == "train" and "model=qwen3_moe_tiny" in base and "train.steps=600" in base
    analyze = plan.job("analyze").command
    assert analyze[0] == "analyze" and "split=train" in analyze and f"model_path='{root / 'base' / 'hf'}'" in analyze
    select = plan.job("select").command
    assert select[0] == "select" and "domains=[code]" in select and "method=gate" in select
    adapt = plan.job("adapt").command
    assert adapt[0] == "adapt" and "method=esft" in adapt and "data.domains=['code']" in adapt
    assert f"esft.mask_file='{root / 'select' / 'esft.mask.json'}'" in adapt
    prune = plan.job("prune").command
    assert prune[0] == "prune" and "keep=4" in prune and "domains=[code]" in prune and "eval_tokens=0" in prune
    assert plan.job("report").command[:1] == ("quickstart",) and "stage=report" in plan.job("report").command


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"domain": "math"}, "unknown domain"),
        ({"data.domains": ["code"]}, "at least 2 domains"),
        ({"prune.keep": 0}, "prune.keep=0: a whole number >= 1"),
        ({"adapt.top_p": 1.5}, "adapt.top_p=1.5 is outside"),
        ({"prune.score": "reap"}, "prune.score='reap': choose token or gate"),
    ],
)
def test_bad_options_are_refused_naming_the_fix(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        plan_quickstart(config(tmp_path, **changes))


def test_a_job_whose_workdir_holds_the_pipeline_is_refused(tmp_path):
    root = tmp_path / "run"
    plan = Plan("x", (Stage("s", (Job("j", ("train",), (str(root / "out"),), workdir=str(root)),)),), {})
    with pytest.raises(OrchestrationError, match="holds the pipeline directory"):
        write_plan(root, plan)
    assert not root.exists()


@pytest.mark.slow
def test_the_whole_lifecycle_writes_one_report(tmp_path, data_cache):
    extra = ["base.steps=30", "adapt.steps=6", "analysis.tokens=1024", "analysis.driver_tokens=256",
             "eval_tokens=512", "prune.keep=2", "data.domains=[code,docs,prose]"]  # fmt: skip
    run = pipelines.connito(pipelines.small("quickstart", tmp_path, data_cache, "lifecycle", *extra), tmp_path)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    root = tmp_path / "lifecycle"
    report = json.loads((root / "report.json").read_text())
    assert len(report["validation_loss"]) == 4
    assert all(set(row) == {"code", "docs", "prose", "all"} for row in report["validation_loss"].values())
    assert report["opted_out"] == [list(e) for e in most_used_experts(root / "analysis", "code", 1)]
    assert AutoConfig.from_pretrained(root / "pruned").num_experts == 2
    text = (root / "report.md").read_text()
    assert "![held-out loss](held_out.png)" in text and (root / "held_out.png").is_file()
    assert (root / "loss_curve.png").is_file() and (root / "analysis" / "utilisation.png").is_file()
    again = pipelines.connito(pipelines.small("quickstart", tmp_path, data_cache, "lifecycle", *extra), tmp_path)
    assert again.returncode == 0 and "every job of" in again.stdout + again.stderr  # nothing runs twice
