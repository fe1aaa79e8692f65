"""Balance terms (connito.routing.balancing) against the papers' own formulas, written out here, and transformers.

DeepSeek-V2 (eq. 12-14), expert-level:  L = sum_i f_i P_i,  f_i = E / (K T) sum_t 1[i in top-k(s_t)],
                                        P_i = (1/T) sum_t s_{i,t}
DeepSeek-V2 (eq. 15-17), device-level:  L = sum_d f'_d P'_d,  f'_d = (1/|E_d|) sum_{j in E_d} f_j,
                                        P'_d = sum_{j in E_d} P_j  (E_d: the experts on device d)
DeepSeek-V3 (eq. 17-20), sequence-wise: the same per sequence, with s'_{i,t} = s_{i,t} / sum_j s_{j,t} (sigmoid
                                        scores normalised per token), averaged over the sequences
z-loss (ST-MoE, eq. 5):                 (1/T) sum_t (log sum_i exp x_{i,t})^2
DeepSeek-V3 bias update (sec. 2.1.2):   b_i <- b_i + u * sign(mean load - load_i)
"""

import pytest
import torch
import torch.distributed as dist

from connito.routing.balancing import (
    device_balance_loss,
    expert_balance_loss,
    router_z_loss,
    sequence_balance_loss,
    updated_expert_bias,
)


def paper_balance(scores_TE: torch.Tensor, top_k: int) -> torch.Tensor:
    tokens, experts = scores_TE.shape
    chosen_TE = torch.zeros_like(scores_TE).scatter_(1, scores_TE.topk(top_k, dim=1).indices, 1.0)
    f_E = experts / (top_k * tokens) * chosen_TE.sum(0)
    p_E = scores_TE.mean(0)
    return (f_E * p_E).sum()


def logits(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32) * 2


def test_expert_balance_loss_is_deepseek_v2s_and_transformers_switch_loss_over_k():
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    logits_TE = logits(64, 8)
    loss = expert_balance_loss(logits_TE, top_k=2)
    torch.testing.assert_close(loss, paper_balance(logits_TE.softmax(-1), 2), rtol=1e-6, atol=0)
    # transformers counts f_i per token (K choices each): K times the same loss
    hf = load_balancing_loss_func((logits_TE,), num_experts=8, top_k=2)
    torch.testing.assert_close(loss * 2, hf, rtol=1e-6, atol=0)
    # balanced routing is the minimum, 1: uniform scores and every expert chosen equally often
    uniform = torch.zeros(8, 8) + torch.eye(8) * 1e-3 + torch.eye(8).roll(1, 0) * 1e-3
    assert expert_balance_loss(uniform, top_k=2).item() == pytest.approx(1.0, abs=1e-3)


def test_the_loss_has_the_gradient_of_the_papers_formula():
    logits_TE = logits(32, 8, seed=1).requires_grad_(True)
    expert_balance_loss(logits_TE, top_k=2).backward()
    reference = logits_TE.detach().clone().requires_grad_(True)
    paper_balance(reference.softmax(-1), 2).backward()
    torch.testing.assert_close(logits_TE.grad, reference.grad, rtol=1e-5, atol=1e-8)


def paper_device_balance(scores_TE: torch.Tensor, top_k: int, devices: int) -> torch.Tensor:
    tokens, experts = scores_TE.shape
    chosen_TE = torch.zeros_like(scores_TE).scatter_(1, scores_TE.topk(top_k, dim=1).indices, 1.0)
    f_E = experts / (top_k * tokens) * chosen_TE.sum(0)
    p_E = scores_TE.mean(0)
    groups = [range(d * experts // devices, (d + 1) * experts // devices) for d in range(devices)]
    f_D = torch.stack([f_E[list(g)].mean() for g in groups])
    p_D = torch.stack([p_E[list(g)].sum() for g in groups])
    return (f_D * p_D).sum()


def test_device_balance_loss_is_deepseek_v2s_over_contiguous_device_groups():
    logits_TE = logits(64, 8, seed=3).requires_grad_(True)
    for devices in (2, 4):
        loss = device_balance_loss(logits_TE, top_k=2, num_devices=devices)
        torch.testing.assert_close(loss, paper_device_balance(logits_TE.softmax(-1), 2, devices), rtol=1e-6, atol=0)
    # the gradient is the formula's
    device_balance_loss(logits_TE, top_k=2, num_devices=2).backward()
    reference = logits_TE.detach().clone().requires_grad_(True)
    paper_device_balance(reference.softmax(-1), 2, 2).backward()
    torch.testing.assert_close(logits_TE.grad, reference.grad, rtol=1e-5, atol=1e-8)
    # one expert per device is the expert-level loss; a balanced load over devices (not over experts) is 1
    torch.testing.assert_close(
        device_balance_loss(logits_TE, 2, num_devices=8), expert_balance_loss(logits_TE, 2), rtol=1e-6, atol=0
    )
    skewed = torch.full((8, 4), -10.0)
    skewed[:, 0] = skewed[:, 2] = 10.0  # every token picks experts 0 and 2: balanced over 2 devices, not over 4
    assert device_balance_loss(skewed, top_k=2, num_devices=2).item() == pytest.approx(1.0, abs=1e-3)
    assert device_balance_loss(skewed, top_k=2, num_devices=4).item() == pytest.approx(2.0, abs=1e-3)
    with pytest.raises(ValueError, match=r"num_devices=3: .* split the 8 experts evenly"):
        device_balance_loss(logits_TE, 2, num_devices=3)


def test_sequence_balance_loss_is_deepseek_v3s_per_sequence_loss_averaged():
    logits_BSE = logits(3, 16, 8, seed=2)
    loss = sequence_balance_loss(logits_BSE, top_k=2, score_function="sigmoid")
    scores_BSE = logits_BSE.sigmoid()
    scores_BSE = scores_BSE / scores_BSE.sum(-1, keepdim=True)
    expected = torch.stack([paper_balance(scores_BSE[b], 2) for b in range(3)]).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    # a batch of one sequence is the expert-level loss of its tokens
    one = sequence_balance_loss(logits_BSE[:1], top_k=2, score_function="sigmoid")
    torch.testing.assert_close(one, expert_balance_loss(logits_BSE[0], 2, "sigmoid"), rtol=1e-6, atol=0)


def test_router_z_loss_is_the_mean_squared_logsumexp():
    logits_TE = logits(20, 8, seed=3)
    torch.testing.assert_close(router_z_loss(logits_TE), logits_TE.logsumexp(-1).pow(2).mean(), rtol=1e-6, atol=0)


def test_bad_arguments_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="score_function='relu'"):
        expert_balance_loss(logits(4, 8), 2, "relu")
    with pytest.raises(ValueError, match="top_k=9 must lie in 1..8"):
        expert_balance_loss(logits(4, 8), 9)
    with pytest.raises(ValueError, match=r"must be \[B, S, E\]"):
        sequence_balance_loss(logits(4, 8), 2)


def test_the_bias_moves_towards_the_mean_load_by_the_rate(tmp_path):
    loads_E = torch.tensor([10.0, 2.0, 5.0, 7.0])  # mean 6
    bias_E = torch.tensor([0.1, -0.2, 0.0, 0.05])
    own_group = not dist.is_initialized()  # another test of this process may have made one
    if own_group:
        with pytest.raises(RuntimeError, match="initialise torch.distributed"):
            updated_expert_bias(loads_E.clone(), bias_E, 0.001)
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        updated = updated_expert_bias(loads_E.clone(), bias_E, 0.001, group=dist.new_group([0]))
    finally:
        if own_group:
            dist.destroy_process_group()
    torch.testing.assert_close(updated, bias_E + torch.tensor([-0.001, 0.001, 0.001, -0.001]))
