"""Expert-threshold routing: causal in training and at inference, thresholds at the capacity quantile of earlier
batches (moving average), top-k before the first estimate."""

import copy

import pytest
import torch

from connito.routing.capacity_threshold import CapacityThreshold
from connito.routing.routed_moe import expert_capacity
from connito.routing.routing_modes import RoutingModes, RoutingOptions
from tests.experts.conftest import build_tiny


def ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def with_thresholds(family: str, **options):
    model = build_tiny(family)
    return model, RoutingModes(model, RoutingOptions("expert_threshold", **options))


def test_the_threshold_moves_to_the_capacity_quantile_after_routing():
    threshold = CapacityThreshold(3, decay=0.75)
    assert not threshold.ready
    first = torch.tensor([[0.1, 0.9, 0.3], [0.4, 0.2, 0.8], [0.7, 0.6, 0.5], [0.2, 0.3, 0.1]])
    threshold.update(first, capacity=2)  # the 2nd largest per expert
    assert threshold.ready and torch.allclose(threshold.threshold_E, torch.tensor([0.4, 0.6, 0.5]))
    assert threshold.passes(first).sum(dim=0).tolist() == [2, 2, 2]
    second = torch.tensor([[0.8, 0.0, 0.0], [0.0, 0.8, 0.0], [0.0, 0.0, 0.9], [0.0, 0.0, 0.0]])
    threshold.update(second, capacity=1)
    moved = 0.75 * torch.tensor([0.4, 0.6, 0.5]) + 0.25 * torch.tensor([0.8, 0.8, 0.9])
    assert torch.allclose(threshold.threshold_E, moved)
    assert threshold.updates.item() == 2
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\)"):
        CapacityThreshold(3, decay=1.0)


def test_the_first_forward_routes_top_k_then_the_batch_sets_the_thresholds():
    model, routing = with_thresholds("qwen3_moe")
    model.train()
    batch = ids(2, 12, seed=1)
    with torch.no_grad():
        model(batch)
    capacity = expert_capacity(24, 1.0, 2, 8)
    for routed in routing.modules.values():
        assert routed.last_mask_TE.sum(dim=1).tolist() == [2] * 24  # top-2 per token
        assert routed.threshold.ready
    model.eval()
    with torch.no_grad():
        model(batch)
    for routed in routing.modules.values():
        # the same batch against thresholds set from itself: each expert takes about its capacity (the first
        # layer's scores are the same as in training; later layers' inputs moved with the new route)
        assert routed.last_mask_TE.sum().item() == pytest.approx(8 * capacity, rel=0.5)
    assert routing.modules[routing.view.moe_layers[0]].last_mask_TE.sum(dim=0).tolist() == [capacity] * 8


def snapshot(model):
    return copy.deepcopy({k: v for k, v in model.state_dict().items() if "threshold" in k})


def routes_and_logits(model, routing, batch):
    with torch.no_grad():
        logits = model(batch).logits
    return {layer: r.last_mask_TE.reshape(*batch.shape, -1) for layer, r in routing.modules.items()}, logits


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "deepseek_v3"])
@pytest.mark.parametrize("training", [True, False])
def test_a_tokens_route_uses_no_later_token_in_training_or_inference(family, training):
    model, routing = with_thresholds(family)
    model.train()
    with torch.no_grad():
        model(ids(4, 16, seed=7))  # thresholds set from an earlier batch
    model.train(training)
    state = snapshot(model)
    batch, position = ids(2, 16, seed=8), 6
    routes, logits = routes_and_logits(model, routing, batch)
    model.load_state_dict(state, strict=False)  # the second forward routes with the same thresholds
    changed = batch.clone()
    changed[0, position + 1 :] = ids(2, 16, seed=9)[0, position + 1 :]
    changed[1] = ids(2, 16, seed=10)[1]
    routes2, logits2 = routes_and_logits(model, routing, changed)
    for layer in routes:
        assert torch.equal(routes[layer][0, : position + 1], routes2[layer][0, : position + 1]), f"layer {layer}"
    torch.testing.assert_close(logits[0, : position + 1], logits2[0, : position + 1], rtol=1e-5, atol=1e-5)
    if training:  # and the training forward did move the thresholds (after routing)
        assert any(not torch.equal(state[k], v) for k, v in snapshot(model).items() if k.endswith("threshold_E"))


def test_loads_stay_near_capacity_over_training_batches():
    model, routing = with_thresholds("qwen3_moe", decay=0.5)
    model.train()
    loads = []
    with torch.no_grad():
        for seed in range(12):
            model(ids(4, 16, seed=seed))
            loads.append(torch.stack([r.last_mask_TE.sum(dim=0).float() for r in routing.modules.values()]))
    mean_load = torch.stack(loads[1:]).mean(dim=0)  # after the first (top-k) batch
    capacity = expert_capacity(64, 1.0, 2, 8)
    assert mean_load.mean().item() == pytest.approx(capacity, rel=0.25)
