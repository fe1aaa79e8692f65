"""Single-expert sufficiency: a top-1 model agrees with itself and loses nothing; a top-2 model's numbers are
what a hand-run top-1 model gives."""

import pytest
import torch

from connito.analysis.sufficiency import single_expert_sufficiency
from connito.analysis.token_loss import next_token_logp, nll
from tests.experts.conftest import build_tiny


def batches():
    gen = torch.Generator().manual_seed(3)
    inputs = [torch.randint(3, 128, (2, 16), generator=gen) for _ in range(2)]
    domains = [torch.randint(0, 2, (2, 16), generator=gen) for _ in range(2)]
    return inputs, domains


def test_a_top_1_model_is_sufficient_by_definition():
    model = build_tiny("qwen3_moe", num_experts_per_tok=1)
    inputs, domains = batches()
    result = single_expert_sufficiency(model, inputs, domains, progress=False)
    assert torch.equal(result.agreement_D, torch.ones(2, dtype=torch.float64))
    assert torch.equal(result.loss_top1_D, result.loss_full_D)
    assert result.tokens_D.sum() == 2 * 2 * 15


def test_top_2_numbers_match_a_hand_run_top_1_model():
    model = build_tiny("qwen3_moe", norm_topk_prob=True)
    top1 = build_tiny("qwen3_moe", norm_topk_prob=True, num_experts_per_tok=1)
    top1.load_state_dict(model.state_dict())
    inputs, domains = batches()
    result = single_expert_sufficiency(model, inputs, domains, num_domains=3, progress=False)
    loss = torch.zeros(3, dtype=torch.float64)
    agree = torch.zeros(3, dtype=torch.float64)
    count = torch.zeros(3, dtype=torch.float64)
    with torch.no_grad():
        for ids, dom in zip(inputs, domains):
            full, one = next_token_logp(model(ids).logits), next_token_logp(top1(ids).logits)
            d = dom[:, 1:].reshape(-1)
            loss.index_add_(0, d, nll(one, ids[:, 1:].reshape(-1)).double())
            agree.index_add_(0, d, (full.argmax(-1) == one.argmax(-1)).double())
            count.index_add_(0, d, torch.ones_like(d, dtype=torch.float64))
    torch.testing.assert_close(result.loss_top1_D[:2], (loss / count)[:2], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result.agreement_D[:2], (agree / count)[:2], rtol=0, atol=0.02)
    assert result.agreement_D[:2].min() < 1 and (result.loss_increase_D[:2] != 0).all()
    assert result.tokens_D[2] == 0 and result.loss_full_D[2].isnan()  # a domain with no tokens: NaN, no division


def test_batches_without_domain_ids_are_refused():
    model = build_tiny("qwen3_moe")
    inputs, _ = batches()
    with pytest.raises(ValueError, match="single_expert_sufficiency: .*|batches but 0 domain id tensors"):
        single_expert_sufficiency(model, inputs, [], progress=False)
