"""One-shot pruning by usage: the experts kept are the most-used ones of each layer, the pruned checkpoint equals
the model with the others opted out, and bad requests are refused before anything is written."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from connito.analysis.report import SCHEMA
from connito.cli.commands.prune import PruneConfig, run
from connito.experts import ExpertView
from connito.models.fingerprint import checkpoint_fingerprint
from connito.retirement.pruning import PruningError, plan_pruning
from connito.routing.opt_out import OptOut
from tests.experts.conftest import build_tiny

INPUT_IDS = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(7))


def analysis_of(path, model, code_LE, docs_LE, tokens=(300, 100)) -> dict:
    view = ExpertView(model)
    return {
        "schema": SCHEMA,
        "model": {
            "path": str(path),
            "fingerprint": checkpoint_fingerprint(path),
            "model_type": "qwen3_moe",
            "num_layers": view.num_layers,
            "moe_layers": view.moe_layers,
            "num_experts": view.num_experts,
            "top_k": view.top_k,
        },  # fmt: skip
        "data": {
            "domains": ["code", "docs"],
            "tokens": {"code": tokens[0], "docs": tokens[1]},
            "usable": {"code": True, "docs": True},
        },  # fmt: skip
        "esft": {
            "gate_score": {"code": code_LE, "docs": docs_LE},
            "selection_ratio": {"code": code_LE, "docs": docs_LE},
        },
    }


@pytest.fixture
def checkpoint(tmp_path):
    model = build_tiny("qwen3_moe")
    path = tmp_path / "ckpt"
    model.save_pretrained(path)
    view = ExpertView(model)
    layers, experts = len(view.moe_layers), view.num_experts
    # code uses expert e with share e+1 (the last experts most), docs uses expert 0 heavily
    code = [[(e + 1) / sum(range(1, experts + 1)) for e in range(experts)] for _ in range(layers)]
    docs = [[1.0 if e == 0 else 0.0 for e in range(experts)] for _ in range(layers)]
    (path / "analysis").mkdir()
    (path / "analysis" / "analysis.json").write_text(json.dumps(analysis_of(path, model, code, docs)))
    return path, model, view


def test_the_most_used_experts_are_kept_and_the_pruned_model_equals_the_opted_out_one(checkpoint, tmp_path):
    path, model, view = checkpoint
    out = tmp_path / "pruned"
    run(PruneConfig(checkpoint=str(path), keep=3, out=str(out), eval_tokens=0), tmp_path)
    record = json.loads((out / "prune_report.json").read_text())
    # pooled (code 300 tokens, docs 100): expert 0 gets docs' whole share, then the highest code experts
    last = view.num_experts - 1
    assert record["kept"] == {str(layer): [0, last - 1, last] for layer in view.moe_layers}
    pruned = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert pruned.config.num_experts == 3
    removed = [tuple(e) for e in record["removed"]]
    with torch.no_grad(), OptOut(model, removed):
        expected = model(INPUT_IDS).logits
    with torch.no_grad():
        assert torch.equal(pruned(INPUT_IDS).logits, expected)


def test_one_domains_workload_keeps_that_domains_experts(checkpoint):
    path, _, view = checkpoint
    analysis = json.loads((path / "analysis" / "analysis.json").read_text())
    plan = plan_pruning(analysis, keep=2, domains=["docs"])
    assert plan.kept == {layer: [0, 1] for layer in view.moe_layers}  # docs uses 0 only; the tie keeps index 1


def test_bad_requests_are_refused_before_anything_is_written(checkpoint, tmp_path):
    path, model, view = checkpoint
    analysis = json.loads((path / "analysis" / "analysis.json").read_text())
    with pytest.raises(PruningError, match=f"keep=1 is below the model's top-k \\({view.top_k}"):
        plan_pruning(analysis, keep=1)
    with pytest.raises(PruningError, match="keep fewer to prune any"):
        plan_pruning(analysis, keep=view.num_experts)
    with pytest.raises(PruningError, match="score='drivers'"):
        plan_pruning(analysis, keep=2, score="drivers")
    other = tmp_path / "other"
    build_tiny("qwen3_moe", seed=1).save_pretrained(other)
    with pytest.raises(PruningError, match="analyses another checkpoint"):
        run(PruneConfig(checkpoint=str(other), analysis_path=str(path / "analysis"), keep=2, out=str(tmp_path / "x"),
                        eval_tokens=0), tmp_path)  # fmt: skip
    assert not (tmp_path / "x").exists()
