"""KeepTopExperts: keeping every chosen expert is the identity bit for bit; keeping one equals the family's own
router run with top_k = 1 (the same weights), with and without top-k renormalisation."""

import pytest
import torch

from connito.routing.edits import KeepTopExperts
from tests.experts.conftest import build_tiny


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_keeping_every_chosen_expert_is_the_identity(family):
    model = build_tiny(family)
    with KeepTopExperts(model, keep=2):
        kept = logits(model, IDS)
    assert torch.equal(kept, logits(model, IDS))


@pytest.mark.parametrize(
    ("family", "overrides"),
    [("qwen3_moe", {"norm_topk_prob": True}), ("qwen3_moe", {"norm_topk_prob": False}), ("mixtral", {}),
     ("olmoe", {})],
)  # fmt: skip
def test_keeping_one_expert_equals_the_family_router_with_top_k_one(family, overrides):
    model = build_tiny(family, **overrides)
    top1 = build_tiny(family, **overrides, num_experts_per_tok=1)
    top1.load_state_dict(model.state_dict())
    with KeepTopExperts(model, keep=1):
        kept = logits(model, IDS)
    torch.testing.assert_close(kept, logits(top1, IDS), rtol=1e-5, atol=1e-5)
    assert (kept - logits(model, IDS)).abs().max() > 1e-3  # and it is not the unedited model


def test_keep_must_be_a_positive_integer():
    model = build_tiny("qwen3_moe")
    for bad in (0, -1, 1.0, True):
        with pytest.raises(ValueError, match="keeps at least one expert per token"):
            KeepTopExperts(model, keep=bad)
