"""Addressing is behaviourally right: (L, e) changes exactly the tokens the router sends to expert e in layer L.

Routing is observed with forward hooks on the router and the MoE block (the model is never edited).
"""

import pytest
import torch

from connito.experts import ExpertId, ExpertView


def _capture(view, model, layer, input_ids):
    """Top-k ids [T, K] from the router and the block output [T, H] of one MoE layer, for one forward."""
    block = view.block(layer).module
    seen = {}
    hooks = [
        view.block(layer).router_module.register_forward_hook(
            lambda m, a, out: seen.__setitem__("topk_ids_TK", out[2])
        ),
        block.register_forward_hook(lambda m, a, out: seen.__setitem__("out_TH", out.reshape(-1, out.shape[-1]))),
    ]
    try:
        with torch.no_grad():
            model(input_ids)
    finally:
        for hook in hooks:
            hook.remove()
    return seen["topk_ids_TK"].clone(), seen["out_TH"].clone()


@pytest.mark.parametrize("experts_implementation", ["grouped_mm", "eager"])
def test_zeroing_one_expert_changes_only_its_tokens(tiny_model, experts_implementation):
    """Under both transformers expert kernels (grouped_mm is the CPU default, eager the per-expert loop)."""
    tiny_model.set_experts_implementation(experts_implementation)
    assert tiny_model.config._experts_implementation == experts_implementation
    view = ExpertView(tiny_model)
    layer = max(view.moe_layers)
    input_ids = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(1))

    topk_ids_TK, before_TH = _capture(view, tiny_model, layer, input_ids)
    assert topk_ids_TK.shape == (48, view.top_k)
    expert = int(torch.bincount(topk_ids_TK.flatten(), minlength=8).argmax())  # the busiest expert
    routed_T = (topk_ids_TK == expert).any(dim=-1)
    assert 0 < int(routed_T.sum()) < routed_T.numel()  # the check below means something

    target = ExpertId(layer, expert)
    weights = view.read_expert(target)
    view.write_expert(target, {**weights, "down_proj": torch.zeros_like(weights["down_proj"])})
    topk_after_TK, after_TH = _capture(view, tiny_model, layer, input_ids)

    assert torch.equal(topk_after_TK, topk_ids_TK)  # earlier layers untouched, so the same routing
    torch.testing.assert_close(after_TH[~routed_T], before_TH[~routed_T], rtol=0, atol=1e-6)
    assert bool(((after_TH[routed_T] - before_TH[routed_T]).abs().amax(dim=-1) > 1e-4).all())


def test_zeroing_an_unused_expert_changes_nothing(tiny_model):
    """The converse: an expert no token picks in layer L leaves the whole block output bit-identical."""
    view = ExpertView(tiny_model)
    layer = min(view.moe_layers)
    input_ids = torch.randint(3, 128, (1, 4), generator=torch.Generator().manual_seed(2))
    topk_ids_TK, before_TH = _capture(view, tiny_model, layer, input_ids)
    unused = sorted(set(range(8)) - set(topk_ids_TK.flatten().tolist()))
    assert unused  # 4 tokens x top-2 cannot reach all 8 experts
    target = ExpertId(layer, unused[0])
    weights = {n: torch.zeros_like(t) for n, t in view.read_expert(target).items()}
    view.write_expert(target, weights)
    _, after_TH = _capture(view, tiny_model, layer, input_ids)
    torch.testing.assert_close(after_TH, before_TH, rtol=0, atol=1e-6)
