"""Expert Choice: every expert takes exactly its capacity of tokens in training, the block computes what the paper's
formula says (a plain reference written here), and the inference route of a token uses no later token."""

import math

import pytest
import torch
from transformers.activations import ACT2FN

from connito.experts import ExpertView
from connito.routing.expert_choice import expert_choice
from connito.routing.routed_moe import expert_capacity
from connito.routing.routing_modes import RoutingModes, RoutingOptions
from tests.experts.conftest import TINY, build_tiny

FAMILIES = sorted(TINY)


def ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def with_expert_choice(family: str, **options):
    model = build_tiny(family)
    return model, RoutingModes(model, RoutingOptions("expert_choice", **options))


def test_capacity_is_tokens_times_factor_times_top_k_over_experts():
    assert expert_capacity(64, 1.0, 2, 8) == 16  # E x C = 128 = T x K: top-k's compute
    assert expert_capacity(24, 1.0, 2, 8) == 6
    assert expert_capacity(10, 1.0, 2, 8) == 3  # 2.5 rounds up
    assert expert_capacity(10, 0.5, 1, 8) == 1  # never below one token
    assert expert_capacity(4, 4.0, 2, 8) == 4  # never above every token
    assert expert_capacity(100, 1.25, 2, 8) == 31  # 31.25


def test_expert_choice_takes_each_experts_best_tokens():
    weights_TE = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.5, 0.7], [0.1, 0.0]])
    token_EC, weight_EC = expert_choice(weights_TE, 2)
    assert token_EC.tolist() == [[0, 2], [1, 2]]
    assert torch.equal(weight_EC, torch.tensor([[0.9, 0.5], [0.8, 0.7]]))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("capacity_factor", [1.0, 0.5, 2.0])
def test_every_expert_takes_exactly_its_capacity_in_training(family, capacity_factor):
    model, routing = with_expert_choice(family, capacity_factor=capacity_factor)
    model.train()
    batch = ids(3, 10, seed=1)
    model(batch).logits.sum().backward()
    capacity = expert_capacity(30, capacity_factor, 2, 8)
    for layer, routed in routing.modules.items():
        assert routed.last_mask_TE.shape == (30, 8)
        assert routed.last_mask_TE.sum(dim=0).tolist() == [capacity] * 8, f"layer {layer}"
    assert routing.metrics()["routing/max_load"] == 1.0
    assert routing.predictor_loss() is not None  # the predictor learns from every training forward


def reference_expert_choice(model, layer: int, hidden_BSH: torch.Tensor, capacity_factor: float) -> torch.Tensor:
    """The block's output by the paper's formula, one (expert, token) product at a time."""
    view = ExpertView(model)
    config = model.config
    x_TH = hidden_BSH.reshape(-1, hidden_BSH.shape[-1])
    logits_TE = x_TH.float() @ view.router_weight(layer).float().T
    sigmoid = config.model_type == "deepseek_v3"
    scores_TE = logits_TE.sigmoid() if sigmoid else logits_TE.softmax(dim=-1)
    scale = getattr(config, "routed_scaling_factor", 1.0) if config.model_type.startswith("deepseek") else 1.0
    num_tokens, num_experts = scores_TE.shape
    capacity = int(num_tokens * capacity_factor * config.num_experts_per_tok / num_experts + 0.5)
    act = ACT2FN[config.hidden_act]
    out_TH = torch.zeros_like(x_TH)
    for expert in range(num_experts):
        tensors = view.read_expert((layer, expert))
        for token in scores_TE[:, expert].argsort(descending=True)[:capacity].tolist():
            gate, up = (tensors["gate_up_proj"] @ x_TH[token]).chunk(2)
            out_TH[token] += scale * scores_TE[token, expert] * (tensors["down_proj"] @ (act(gate) * up))
    shared = view.shared_experts(layer)
    if shared is not None:
        shared_TH = shared(x_TH)
        gate = view.shared_expert_gate(layer)
        out_TH = out_TH + (torch.sigmoid(gate(x_TH)) * shared_TH if gate is not None else shared_TH)
    return out_TH.reshape(hidden_BSH.shape)


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v2", "deepseek_v3"])
def test_the_block_matches_a_plain_reference_of_the_paper(family):
    model, routing = with_expert_choice(family, capacity_factor=1.5)
    model.train()
    layer = routing.view.moe_layers[-1]
    hidden = torch.randn(2, 9, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = routing.view.block(layer).module(hidden)
        expected = reference_expert_choice(model, layer, hidden, 1.5)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def routes_and_logits(model, routing, batch):
    with torch.no_grad():
        logits = model(batch).logits
    shape = (*batch.shape, -1)
    return {layer: r.last_mask_TE.reshape(shape) for layer, r in routing.modules.items()}, logits


def perturb_after(batch: torch.Tensor, position: int, seed: int) -> torch.Tensor:
    """Every token of row 0 after ``position`` and all of row 1 replaced."""
    changed = batch.clone()
    fresh = ids(*batch.shape, seed=seed)
    changed[0, position + 1 :] = fresh[0, position + 1 :]
    changed[1:] = fresh[1:]
    assert not torch.equal(changed, batch)
    return changed


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "deepseek_v3"])
@pytest.mark.parametrize("inference", ["calibrated", "half", "top_k"])
def test_the_inference_route_of_a_token_uses_no_later_token(family, inference):
    model, routing = with_expert_choice(family, predictor_inference=inference)
    model.train()
    with torch.no_grad():
        model(ids(4, 16, seed=7))  # one training forward: the calibrated thresholds exist
    model.eval()
    batch, position = ids(2, 16, seed=8), 6
    routes, logits = routes_and_logits(model, routing, batch)
    routes2, logits2 = routes_and_logits(model, routing, perturb_after(batch, position, seed=9))
    for layer in routes:
        assert torch.equal(routes[layer][0, : position + 1], routes2[layer][0, : position + 1]), f"layer {layer}"
    torch.testing.assert_close(logits[0, : position + 1], logits2[0, : position + 1], rtol=1e-5, atol=1e-5)
    assert any(r[0].any() for r in routes.values()), "the predictor routes some tokens"
    if inference == "top_k":
        assert all(r.sum(dim=-1).eq(2).all() for r in routes.values())


def test_the_training_route_does_leak_the_future():
    """The control for the test above: Expert Choice itself changes earlier tokens' routes when later ones change."""
    model, routing = with_expert_choice("qwen3_moe")
    batch, position = ids(2, 16, seed=8), 6
    model.train()
    routes, _ = routes_and_logits(model, routing, batch)
    routes2, _ = routes_and_logits(model, routing, perturb_after(batch, position, seed=9))
    assert any(not torch.equal(routes[lay][0, : position + 1], routes2[lay][0, : position + 1]) for lay in routes)


def test_eval_can_use_the_leaky_training_route_for_comparison():
    model, routing = with_expert_choice("qwen3_moe")
    model.eval()
    routing.set_eval_route("expert_choice")
    routes, _ = routes_and_logits(model, routing, ids(2, 12, seed=1))
    assert all(r.reshape(-1, 8).sum(dim=0).tolist() == [6] * 8 for r in routes.values())
    with pytest.raises(ValueError, match="eval routes are 'predictor' or 'expert_choice'"):
        routing.set_eval_route("top_k")


def test_the_predictor_sees_detached_inputs_and_learns_the_selection():
    model, routing = with_expert_choice("qwen3_moe")
    model.train()
    batch = ids(4, 16, seed=2)
    predictors = [p for r in routing.modules.values() for p in r.predictor.parameters()]
    optimizer = torch.optim.Adam(predictors, lr=0.05)
    losses = []
    for _ in range(30):
        model(batch)
        loss = routing.predictor_loss()
        optimizer.zero_grad()
        loss.backward()
        losses.append(loss.item())
        optimizer.step()
        others = [p for n, p in model.named_parameters() if "predictor" not in n]
        assert all(p.grad is None for p in others), "the predictor's loss reaches the predictor only"
    assert losses[-1] < 0.6 * losses[0]
    assert math.isfinite(losses[-1])


def test_removing_the_mode_gives_the_familys_routing_back():
    model = build_tiny("qwen2_moe")
    batch = ids(2, 8, seed=4)
    with torch.no_grad():
        before = model(batch).logits
    routing = RoutingModes(model, RoutingOptions("expert_choice"))
    assert any(".connito_routing.predictor." in k for k in model.state_dict())
    routing.remove()
    with torch.no_grad():
        assert torch.equal(model(batch).logits, before)
    assert not any("connito_routing" in k for k in model.state_dict())
