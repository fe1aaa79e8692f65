"""Mean feed-forward inputs per decoder layer (connito.composition.hidden_means), checked by hand on tiny models."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from connito.composition.hidden_means import mean_ffn_inputs
from connito.models.families import ModelError
from tests.composition.tiny import TINY_DENSE

TINY = {**TINY_DENSE, "pad_token_id": 0}
MOE = {
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
}


def tiny(model_type: str):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **TINY, **MOE.get(model_type, {})))


def batches():
    generator = torch.Generator().manual_seed(1)
    short = torch.randint(3, 128, (2, 5), generator=generator)
    long = torch.randint(3, 128, (3, 9), generator=generator)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, 6:] = 0  # right padding: 3 + 2 positions are not tokens
    mask[2, 7:] = 0
    return [{"input_ids": short}, {"input_ids": long, "attention_mask": mask, "labels": long}]


def by_hand(model, batch) -> tuple[torch.Tensor, int]:
    """Per layer: the post-attention norm applied to (the layer's input from output_hidden_states + its attention
    output), summed over the real token positions; and their count."""
    layers = model.model.layers
    attention = {}
    handles = [
        layer.self_attn.register_forward_hook(lambda m, a, out, i=i: attention.__setitem__(i, out[0]))
        for i, layer in enumerate(layers)
    ]
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k != "labels"}, output_hidden_states=True)
        for handle in handles:
            handle.remove()
        keep = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
        sums = [
            layer.post_attention_layernorm(out.hidden_states[i] + attention[i])[keep].double().sum(0)
            for i, layer in enumerate(layers)
        ]
    return torch.stack(sums), int(keep.sum())


def test_the_mean_is_the_post_attention_norm_output_over_real_tokens_weighted_by_count():
    model = tiny("llama").train()
    total, count = torch.zeros(2, 64, dtype=torch.float64), 0
    per_batch = []
    for batch in batches():
        sums, n = by_hand(model.eval(), batch)
        total, count = total + sums, count + n
        per_batch.append(sums / n)
    model.train()
    means_LH = mean_ffn_inputs(model, batches())
    assert model.training  # the caller's mode is restored
    assert means_LH.dtype == torch.float32 and means_LH.shape == (2, 64)
    torch.testing.assert_close(means_LH, (total / count).float(), rtol=1e-5, atol=1e-6)
    # 10 + 22 tokens: a batch counts by its tokens, not once (the mean of the batch means is another number)
    unweighted = ((per_batch[0] + per_batch[1]) / 2).float()
    assert (means_LH - unweighted).abs().max() > 1e-3
    # padding counts: ignoring the mask gives another mean
    unmasked = [{"input_ids": b["input_ids"]} for b in batches()]
    assert (mean_ffn_inputs(model, unmasked) - means_LH).abs().max() > 1e-4


def test_bare_id_tensors_and_moe_families_hook_the_router_input():
    for model_type in MOE:
        model = tiny(model_type).eval()
        ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(2))
        router_inputs = [[] for _ in model.model.layers]
        handles = [
            layer.mlp.gate.register_forward_pre_hook(lambda m, a, seen=seen: seen.append(a[0].reshape(-1, 64)))
            for layer, seen in zip(model.model.layers, router_inputs)
        ]
        means_LH = mean_ffn_inputs(model, [ids[0], ids[1:]])  # a [S] and a [B, S] tensor
        for handle in handles:
            handle.remove()
        expected = torch.stack([torch.cat(seen).double().mean(0) for seen in router_inputs]).float()
        torch.testing.assert_close(means_LH, expected, rtol=1e-5, atol=1e-6)


def test_refuses_what_is_not_a_batch_or_holds_no_token():
    model = tiny("llama")
    with pytest.raises(ModelError, match="batch 0 is a list; expected a LongTensor"):
        mean_ffn_inputs(model, [[1, 2, 3]])
    with pytest.raises(ModelError, match="held no token"):
        mean_ffn_inputs(model, [{"input_ids": torch.ones(1, 4, dtype=torch.long), "attention_mask": torch.zeros(1, 4)}])
