"""``connito quickstart``: the lifecycle plan (train, analyze, select, ESFT + prune side by side, report), the
options it refuses, the guard against a job whose workdir would swallow the pipeline, and (slow) the whole
lifecycle on small data: one report with every model's held-out loss, a pruned checkpoint of the size asked for,
the opted-out experts the ones code's tokens choose most, counted apart from Connito's analysis."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from connito.data import prepare_data
from connito.data.config import DataConfig
from connito.orchestration import OrchestrationError
from connito.orchestration.jobs import Job, Stage
from connito.orchestration.plan import Plan, write_plan
from connito.orchestration.quickstart import QuickstartConfig, plan_quickstart
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


def expert_choices_by_router_hooks(root: Path, domain: str) -> tuple[torch.Tensor, int]:
    """How many of ``domain``'s tokens choose each expert, ``[MoE layer, expert]``, and how many tokens there are,
    counted without Connito's analysis (no observer, statistics, record or scores): the base checkpoint in plain
    transformers, a forward pre-hook on every Qwen3-MoE router (``mlp.gate``, an [E, H] weight) taking the hidden
    states it routes, and ``torch.topk`` of their logits (softmax keeps the order). The tokens are those ``connito
    analyze`` reads: the pipeline's data prepared with the checkpoint's own tokenizer, ``analysis.tokens`` x domains
    tokens in rows evenly spread over the train split."""
    settings = json.loads((root / "report.json").read_text())["settings"]
    base = root / "base" / "hf"
    assert (base / "tokenizer.json").is_file()
    prepared = prepare_data(DataConfig(**{**settings["data"], "tokenizer_path": str(base)}), progress=False)
    split = prepared.load_split("train")
    tokens = settings["analysis"]["tokens"] * len(prepared.domains)
    rows = torch.linspace(0, len(split) - 1, min(len(split), -(-tokens // prepared.seq_len))).round().long().unique()
    batch = split[rows.tolist()]
    mine_N = batch["domain_ids"].reshape(-1) == prepared.domains.index(domain)

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    k, num_experts = model.config.num_experts_per_tok, model.config.num_experts
    routers = [layer.mlp.gate for layer in model.model.layers]
    counts_LE = torch.zeros(len(routers), num_experts, dtype=torch.long)

    def count(layer: int):
        def hook(router, args):
            hidden_NH = args[0].reshape(-1, router.weight.shape[1])
            chosen_NK = torch.topk(hidden_NH @ router.weight.T, k, dim=-1).indices
            counts_LE[layer] += torch.bincount(chosen_NK[mine_N].reshape(-1), minlength=num_experts)

        return hook

    handles = [router.register_forward_pre_hook(count(i)) for i, router in enumerate(routers)]
    with torch.no_grad():
        model(input_ids=batch["input_ids"])
    for handle in handles:
        handle.remove()
    assert (counts_LE.sum(dim=1) == int(mine_N.sum()) * k).all()
    return counts_LE, int(mine_N.sum())


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
    counts_LE, tokens = expert_choices_by_router_hooks(root, "code")
    assert tokens == json.loads((root / "analysis" / "analysis.json").read_text())["data"]["tokens"]["code"]
    assert [layer for layer, _ in report["opted_out"]] == list(range(len(counts_LE))), report["opted_out"]
    for layer, expert in report["opted_out"]:  # one per layer, the most chosen (any of them, were there a tie)
        assert counts_LE[layer, expert] == counts_LE[layer].max(), (layer, expert, counts_LE[layer].tolist())
    assert AutoConfig.from_pretrained(root / "pruned").num_experts == 2
    text = (root / "report.md").read_text()
    assert "![held-out loss](held_out.png)" in text and (root / "held_out.png").is_file()
    assert (root / "loss_curve.png").is_file() and (root / "analysis" / "utilisation.png").is_file()
    again = pipelines.connito(pipelines.small("quickstart", tmp_path, data_cache, "lifecycle", *extra), tmp_path)
    assert again.returncode == 0 and "every job of" in again.stdout + again.stderr  # nothing runs twice
