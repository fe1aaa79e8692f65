"""Shared experts from routed ones: the built shared expert is the old one plus exactly the merged picked experts
(before distillation), the picked experts leave routing, the result reloads in plain transformers, distillation
lowers the layer's error without touching the old shared weights, and bad requests are refused with the input
checkpoint untouched."""

import hashlib
import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from connito.analysis.report import SCHEMA
from connito.experts import ExpertView
from connito.models.fingerprint import checkpoint_fingerprint
from connito.retirement.sharing import SharingError, build_shared, distill_shared, plan_sharing, share_checkpoint
from tests.experts.conftest import build_tiny

INPUT_IDS = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(3))


def analysis_of(path, model, driver_LE, gate_LE) -> dict:
    view = ExpertView(model)
    model_section = {"path": str(path), "fingerprint": checkpoint_fingerprint(path),
                     "model_type": model.config.model_type, "num_layers": view.num_layers,
                     "moe_layers": view.moe_layers, "num_experts": view.num_experts, "top_k": view.top_k}  # fmt: skip
    return {
        "schema": SCHEMA,
        "model": model_section,
        "data": {"domains": ["code"], "tokens": {"code": 100}, "usable": {"code": True}},
        "esft": {"gate_score": {"code": gate_LE}, "selection_ratio": {"code": gate_LE}},
        "drivers": {"tokens": {"code": 100}, "score": {"code": driver_LE}},
    }


def make(tmp_path, model_type):
    model = build_tiny(model_type)
    path = tmp_path / model_type
    model.save_pretrained(path)
    view = ExpertView(model)
    layers, experts = len(view.moe_layers), view.num_experts
    drivers = [[0.01 * ((e * 3 + i) % experts) for e in range(experts)] for i in range(layers)]  # differ by layer
    gate = [[0.05 + 0.01 * e for e in range(experts)] for _ in range(layers)]
    (path / "analysis.json").write_text(json.dumps(analysis_of(path, model, drivers, gate)))
    return path, model, view, json.loads((path / "analysis.json").read_text())


def swiglu(x, gate_up, down):
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, down)


@pytest.mark.parametrize("model_type", ["deepseek_v2", "qwen2_moe"])
def test_the_shared_expert_is_the_old_one_plus_the_merged_drivers_and_the_drivers_leave_routing(tmp_path, model_type):
    path, model, view, analysis = make(tmp_path, model_type)
    plan = plan_sharing(analysis, path, per_layer=2)
    for i, layer in enumerate(view.moe_layers):
        scores = torch.tensor(analysis["drivers"]["score"]["code"][i])
        assert plan.picked[layer] == scores.topk(2).indices.tolist()
    shared = build_shared(model, plan)
    new = ExpertView(shared)
    assert new.num_experts == view.num_experts - 2
    x = torch.randn(5, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    for layer in view.moe_layers:
        picked = plan.picked[layer]
        gates = torch.tensor([analysis["esft"]["gate_score"]["code"][view.moe_layers.index(layer)][e] for e in picked],
                             dtype=torch.float64)  # fmt: skip
        weights, scale = gates / gates.sum(), float(gates.sum())
        experts = [view.read_expert((layer, e)) for e in picked]
        gate_up = sum(w * t["gate_up_proj"].double() for w, t in zip(weights.tolist(), experts, strict=True)).float()
        down = (
            scale * sum(w * t["down_proj"].double() for w, t in zip(weights.tolist(), experts, strict=True))
        ).float()
        with torch.no_grad():
            expected = view.shared_experts(layer)(x) + swiglu(x, gate_up, down)
            torch.testing.assert_close(new.shared_experts(layer)(x), expected, rtol=1e-5, atol=1e-6)
        kept = [e for e in range(view.num_experts) if e not in picked]
        for new_id, old_id in enumerate(kept):
            now, before = new.read_expert((layer, new_id)), view.read_expert((layer, old_id))
            assert all(torch.equal(now[k], before[k]) for k in before)
        assert torch.equal(new.read_router(layer), view.read_router(layer)[kept])
    out = tmp_path / "shared"
    shared.save_pretrained(out)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(INPUT_IDS).logits, shared.eval()(INPUT_IDS).logits)


def test_distillation_lowers_the_layer_error_and_keeps_the_old_shared_weights(tmp_path):
    path, model, view, analysis = make(tmp_path, "deepseek_v2")
    shared = build_shared(model, plan_sharing(analysis, path, per_layer=2))
    width = model.config.moe_intermediate_size
    old = {layer: {k: v.detach().clone() for k, v in ExpertView(shared).shared_experts(layer).state_dict().items()}
           for layer in view.moe_layers}  # fmt: skip
    mse = distill_shared(model, shared, [INPUT_IDS], width, steps=40, lr=3e-3)
    for layer in view.moe_layers:
        before, after = mse[layer]
        assert after < before
        now = ExpertView(shared).shared_experts(layer).state_dict()
        assert torch.equal(now["gate_proj.weight"][:-width], old[layer]["gate_proj.weight"][:-width])
        assert torch.equal(now["down_proj.weight"][:, :-width], old[layer]["down_proj.weight"][:, :-width])
        assert not torch.equal(now["down_proj.weight"][:, -width:], old[layer]["down_proj.weight"][:, -width:])


def digest(path) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(path.iterdir()) if p.is_file())).hexdigest()


def test_bad_requests_are_refused_and_the_input_is_never_changed(tmp_path):
    path, model, view, analysis = make(tmp_path, "deepseek_v2")
    before = digest(path)
    with pytest.raises(SharingError, match="between 1 and 6 experts per layer"):
        plan_sharing(analysis, path, per_layer=7)
    with pytest.raises(SharingError, match="pick='often'"):
        plan_sharing(analysis, path, per_layer=1, pick="often")
    other, *_ = make(tmp_path / "other", "qwen2_moe")
    with pytest.raises(SharingError, match="the analysis is of another model"):
        plan_sharing(analysis, other, per_layer=1)
    with pytest.raises(SharingError, match="the analysis is of another model"):
        share_checkpoint(other, path / "analysis.json", 1, tmp_path / "out-other")
    qwen3, *_ = make(tmp_path / "q3", "qwen3_moe")
    with pytest.raises(SharingError, match="qwen3_moe has no shared-expert slot"):
        share_checkpoint(qwen3, qwen3 / "analysis.json", 1, tmp_path / "out-q3")
    out, plan, _ = share_checkpoint(path, path / "analysis.json", 1, tmp_path / "out", calibration=[INPUT_IDS],
                                    distill_steps=3)  # fmt: skip
    assert digest(path) == before
    assert not (tmp_path / "out-other").exists() and not (tmp_path / "out-q3").exists()
    record = json.loads((out / "connito_share.json").read_text())
    assert record["shared_from"] == {str(k): v for k, v in plan.picked.items()}
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.n_shared_experts == model.config.n_shared_experts + 1
    assert reloaded.config.n_routed_experts == model.config.n_routed_experts - 1
