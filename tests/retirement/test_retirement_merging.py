"""Expert merging: a merge of two identical experts is lossless (the merged expert is bit for bit the first, the
model equals the one with the duplicate removed), similar experts are found, and bad merges are refused with the
input checkpoint untouched."""

import hashlib

import pytest
import torch
from transformers import AutoModelForCausalLM

from connito.experts import ExpertAddressError, ExpertView
from connito.retirement.merging import MergeError, merge_checkpoint, merge_experts, plan_merge, weight_similarity
from connito.routing.opt_out import OptOut, remove_experts
from tests.experts.conftest import TINY, build_tiny

INPUT_IDS = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(7))


def make_identical(model, pairs) -> None:
    """Expert b becomes a copy of expert a (weights, router row, choice bias) for every (a, b) in every MoE layer."""
    view = ExpertView(model)
    for layer in view.moe_layers:
        for a, b in pairs:
            view.write_expert((layer, b), view.read_expert((layer, a)))
            view.write_router_rows(layer, [b], view.read_router(layer)[a][None])
            bias = view.choice_bias(layer)
            if bias is not None:
                bias_E = bias.detach().clone()
                bias_E[b] = bias_E[a]
                view.write_choice_bias(layer, bias_E)


def digest(path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_merging_two_identical_experts_is_lossless(model_type):
    # DeepSeek-V3 routes group-limited (2 groups of 4): each group must lose as many experts
    pairs = [(0, 1), (4, 6)] if model_type == "deepseek_v3" else [(2, 5)]
    model = build_tiny(model_type)
    make_identical(model, pairs)
    view = ExpertView(model)
    groups = [[layer, a, b] for layer in view.moe_layers for a, b in pairs]
    usage_LE = torch.rand(len(view.moe_layers), view.num_experts, generator=torch.Generator().manual_seed(3))
    merged = merge_experts(model, plan_merge(view, groups=groups, usage_LE=usage_LE)).eval()
    removed = [(layer, b) for layer in view.moe_layers for _, b in pairs]
    merged_view = ExpertView(merged)
    first = pairs[0][0]  # no expert below it removed: its new id is its old one
    for layer in view.moe_layers:
        original = view.read_expert((layer, first))
        for name, tensor in merged_view.read_expert((layer, first)).items():
            assert torch.equal(tensor, original[name])
        assert torch.equal(merged_view.read_router(layer)[first], view.read_router(layer)[first])
    with torch.no_grad():
        logits = merged(INPUT_IDS).logits
        assert torch.equal(logits, remove_experts(model, removed).eval()(INPUT_IDS).logits)
        with OptOut(model, removed):
            assert torch.equal(logits, model(INPUT_IDS).logits)


def test_a_merge_averages_by_usage_and_combines_router_rows():
    model = build_tiny("qwen3_moe")
    view = ExpertView(model)
    usage_LE = torch.zeros(len(view.moe_layers), view.num_experts)
    usage_LE[:, 1], usage_LE[:, 3] = 0.3, 0.1  # shares 3/4 and 1/4
    plan = plan_merge(view, groups=[[layer, 1, 3] for layer in view.moe_layers], usage_LE=usage_LE)
    assert all(g.shares == pytest.approx((0.75, 0.25)) for g in plan.groups)
    merged_view = ExpertView(merge_experts(model, plan))
    layer = view.moe_layers[0]
    a, b = view.read_expert((layer, 1)), view.read_expert((layer, 3))
    for name, tensor in merged_view.read_expert((layer, 1)).items():
        torch.testing.assert_close(tensor, 0.75 * a[name] + 0.25 * b[name])
    router = view.read_router(layer)
    torch.testing.assert_close(merged_view.read_router(layer)[1], 0.75 * router[1] + 0.25 * router[3])
    assert merged_view.num_experts == view.num_experts - 1


def test_similar_experts_are_found_by_weights():
    model = build_tiny("qwen3_moe")
    make_identical(model, [(2, 6)])
    view = ExpertView(model)
    assert torch.allclose(weight_similarity(view)[:, 2, 6], torch.ones(len(view.moe_layers), dtype=torch.float64))
    plan = plan_merge(view, keep=view.num_experts - 1, similarity="weight")
    assert [(g.layer, g.experts) for g in plan.groups] == [(layer, (2, 6)) for layer in view.moe_layers]
    assert plan.kept == {layer: [e for e in range(view.num_experts) if e != 6] for layer in view.moe_layers}
    plan = plan_merge(view, keep=view.top_k, similarity="weight")
    assert all(len(experts) == view.top_k for experts in plan.kept.values())


def test_bad_merges_are_refused_and_the_input_is_never_modified(tmp_path):
    model = build_tiny("qwen3_moe")
    path = tmp_path / "ckpt"
    model.save_pretrained(path)
    before = digest(path)
    view = ExpertView(model)
    layers, E = view.moe_layers, view.num_experts
    bad = {
        "mixes experts of layers": [[(layers[0], 3), (layers[1], 3)]],
        "lists expert 3 of layer .* twice: merging an expert with itself": [[layer, 3, 3] for layer in layers],
        "has 1 expert": [[layer, 3] for layer in layers],
        "fewer than top-k 2": [[layer, *range(E)] for layer in layers],
        "different numbers of experts": [[layers[0], 1, 2]],
        "is in two merge groups": [[layer, 1, 2] for layer in layers] + [[layer, 2, 4] for layer in layers],
    }
    for message, groups in bad.items():
        with pytest.raises(MergeError, match=message):
            merge_checkpoint(path, tmp_path / "out", groups=groups, frequency="uniform")
    with pytest.raises(ExpertAddressError):
        merge_checkpoint(path, tmp_path / "out", groups=[[layer, 1, E] for layer in layers], frequency="uniform")
    with pytest.raises(MergeError, match="keep=1: merge down to between top-k"):
        merge_checkpoint(path, tmp_path / "out", keep=1, similarity="weight", frequency="uniform")
    with pytest.raises(MergeError, match="give analysis_path="):
        merge_checkpoint(path, tmp_path / "out", keep=4)
    with pytest.raises(Exception, match="Connito never writes into its inputs"):
        merge_checkpoint(path, path, keep=4, similarity="weight", frequency="uniform", overwrite=True)
    assert not (tmp_path / "out").exists()
    out, plan = merge_checkpoint(
        path, tmp_path / "out", groups=[[layer, 1, 2] for layer in layers], frequency="uniform"
    )
    assert AutoModelForCausalLM.from_pretrained(out, local_files_only=True).config.num_experts == E - 1
    assert digest(path) == before
