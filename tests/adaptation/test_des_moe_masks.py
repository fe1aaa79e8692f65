"""Per-token gradient masks: an expert's gradient is the gradient from its allowed tokens alone (against a reference
that computes each routed pair by hand and lets only the allowed ones reach the expert's weights), every other
gradient and the forward are the unmasked model's, and nothing changes where masks do not apply."""

import pytest
import torch
import torch.nn.functional as F

from connito.adaptation.des_moe.token_masks import TokenGradientMasks
from connito.experts import ExpertView
from tests.experts.conftest import build_tiny

DOMAINS = 3


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [2, 12] and per-token domains in -1..2 (mixed inside each row, -1 = no domain)."""
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(seed))
    domains = torch.randint(-1, DOMAINS, (2, 12), generator=torch.Generator().manual_seed(seed + 1))
    return ids, domains


def loss_of(model, ids) -> torch.Tensor:
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def tap_blocks(view: ExpertView) -> tuple[dict, list]:
    """Per MoE layer: the block's input, its output (gradient retained) and the router's decision."""
    taps, handles = {}, []
    for layer, block in view.blocks():
        tap = taps.setdefault(layer, {})

        def take_input(module, args, tap=tap):
            tap["hidden"] = args[0].detach().reshape(-1, args[0].shape[-1])

        def take_output(module, args, output, tap=tap):
            output.retain_grad()
            tap["output"] = output

        def take_routing(module, args, output, tap=tap):
            tap["weights"], tap["ids"] = output[1].detach(), output[2]

        handles += [
            block.module.register_forward_pre_hook(take_input),
            block.module.register_forward_hook(take_output),
            block.router_module.register_forward_hook(take_routing),
        ]
    return taps, handles


def reference_expert_grads(block, tap, allowed_TK) -> tuple[torch.Tensor, torch.Tensor]:
    """d(loss)/d(gate_up_proj, down_proj) from the allowed (token, expert) pairs only, computed pair by pair:
    ``sum_{allowed} w_tk * f_e(h_t)`` contracted with the gradient that reached the block's output."""
    experts = block.experts_module
    hidden, grad_out = tap["hidden"], tap["output"].grad.reshape(tap["hidden"].shape)
    contribution = hidden.new_zeros(())
    for t, k in allowed_TK.nonzero().tolist():
        e = int(tap["ids"][t, k])
        gate, up = F.linear(hidden[t], experts.gate_up_proj[e]).chunk(2, dim=-1)
        out = F.linear(experts.act_fn(gate) * up, experts.down_proj[e]) * tap["weights"][t, k]
        contribution = contribution + (out * grad_out[t]).sum()
    return torch.autograd.grad(contribution, [experts.gate_up_proj, experts.down_proj], allow_unused=False)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_an_experts_gradient_sums_only_over_its_allowed_tokens(family):
    model = build_tiny(family).train()
    view = ExpertView(model)
    ids, domains = batch()
    plain_loss = loss_of(model, ids)
    plain_loss.backward()
    plain = grads(model)
    model.zero_grad()

    allowed_DLE = torch.rand(DOMAINS, len(view.moe_layers), 8, generator=torch.Generator().manual_seed(5)) > 0.4
    masks = TokenGradientMasks(model)
    masks.set_allowed(allowed_DLE)
    masks.set_domains(domains.reshape(-1))
    taps, handles = tap_blocks(view)
    masked_loss = loss_of(model, ids)
    masked_loss.backward()
    for handle in handles:
        handle.remove()
    masked = grads(model)

    torch.testing.assert_close(masked_loss, plain_loss, rtol=1e-6, atol=1e-6)  # the forward is unchanged
    domains_T = domains.reshape(-1)
    disallowed_pairs = 0
    for index, (layer, block) in enumerate(view.blocks()):
        tap = taps[layer]
        allowed_TK = torch.zeros_like(tap["ids"], dtype=torch.bool)
        has_domain = domains_T >= 0
        allowed_TK[has_domain] = allowed_DLE[domains_T[has_domain][:, None], index, tap["ids"][has_domain]]
        disallowed_pairs += int((~allowed_TK).sum())
        ref_gate_up, ref_down = reference_expert_grads(block, tap, allowed_TK)
        prefix = f"{block.prefix}.{view.layout.experts_attr}"
        torch.testing.assert_close(masked[f"{prefix}.gate_up_proj"], ref_gate_up, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(masked[f"{prefix}.down_proj"], ref_down, rtol=1e-5, atol=1e-7)
        # an expert no token may train gets an exactly zero gradient
        never = [e for e in range(8) if not allowed_TK[tap["ids"] == e].any()]
        assert all(not masked[f"{prefix}.down_proj"][e].any() for e in never)
        assert not torch.equal(masked[f"{prefix}.down_proj"], plain[f"{prefix}.down_proj"])
    assert disallowed_pairs > 10
    # every gradient but the routed experts' is the unmasked one: hidden states and routing weights still learn
    others = [n for n in plain if ".experts." not in n]
    assert len(others) > 10 and any(".gate.weight" in n for n in others)
    for name in others:
        torch.testing.assert_close(masked[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)


def test_masks_stand_aside_when_everything_is_allowed_without_a_map_and_without_autograd():
    model = build_tiny("qwen3_moe").train()
    view = ExpertView(model)
    ids, domains = batch(3)
    loss_of(model, ids).backward()
    plain = grads(model)
    masks = TokenGradientMasks(model)
    masks.set_domains(domains.reshape(-1))
    model.zero_grad()
    loss_of(model, ids).backward()  # no map: the fused call as it is, bit for bit
    assert all(torch.equal(grads(model)[n], plain[n]) for n in plain)
    # a map allowing every expert to every domain, tokens all with a domain: nothing to split, bit for bit
    masks.set_allowed(torch.ones(DOMAINS, len(view.moe_layers), 8, dtype=torch.bool))
    masks.set_domains(domains.clamp(min=0).reshape(-1))
    model.zero_grad()
    loss_of(model, ids).backward()
    assert all(torch.equal(grads(model)[n], plain[n]) for n in plain)
    # tokens without a domain (-1) train no expert, whatever the map
    masks.set_domains(torch.full_like(domains, -1).reshape(-1))
    model.zero_grad()
    loss_of(model, ids).backward()
    assert all(not grads(model)[n].any() for n in plain if ".experts." in n)
    # evaluation (no autograd): untouched, even with a map that allows nothing
    masks.set_allowed(torch.zeros(DOMAINS, len(view.moe_layers), 8, dtype=torch.bool))
    with torch.no_grad():
        evaluated = model(input_ids=ids).logits
        masks.remove()
        assert torch.equal(evaluated, model(input_ids=ids).logits)


def test_masks_refuse_domains_that_do_not_match_the_forward():
    model = build_tiny("olmoe").train()
    masks = TokenGradientMasks(model)
    masks.set_allowed(torch.zeros(DOMAINS, 3, 8, dtype=torch.bool))
    masks.set_domains(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="routes 24 tokens but the micro-batch has 5 domain ids"):
        model(input_ids=batch()[0])
    with pytest.raises(ValueError, match=r"expected \[domains, 3, 8\]"):
        masks.set_allowed(torch.zeros(DOMAINS, 2, 8, dtype=torch.bool))
