"""The family adapters against real tiny transformers models: where experts are, exact read/write, counts."""

import pytest
import torch
from torch import nn

from connito.experts import ExpertAddressError, ExpertId, MoEAdapter, MoELayout, adapter_for, register_adapter


def test_finds_moe_layers_and_router_settings(tiny_model, model_type, expected_moe_layers):
    adapter = adapter_for(tiny_model)
    assert adapter.model_type == model_type
    blocks = adapter.moe_layers(tiny_model)
    assert sorted(blocks) == expected_moe_layers
    assert adapter.num_layers(tiny_model) == 3
    assert adapter.num_experts(tiny_model) == 8
    assert adapter.top_k(tiny_model) == 2
    for block in blocks.values():
        assert adapter.router(block).top_k == 2
        assert tuple(adapter.router_weight(block).shape) == (8, 64)  # [E, H]
        params = adapter.expert_parameters(block)
        inter = params["down_proj"].shape[-1]
        assert tuple(params["gate_up_proj"].shape) == (8, 2 * inter, 64)  # [E, 2I, H]
        assert tuple(params["down_proj"].shape) == (8, 64, inter)  # [E, H, I]
        assert all(p is getattr(adapter.experts(block), n) for n, p in params.items())


def test_shared_experts_and_router_bias(tiny_model, model_type):
    adapter = adapter_for(tiny_model)
    block = next(iter(adapter.moe_layers(tiny_model).values()))
    shared, gate, bias = adapter.shared_experts(block), adapter.shared_expert_gate(block), adapter.router_bias(block)
    if model_type == "qwen2_moe":
        assert shared is block.shared_expert and gate is block.shared_expert_gate
        assert tuple(gate.weight.shape) == (1, 64)
    elif model_type.startswith("deepseek"):
        assert shared is block.shared_experts and gate is None
    else:
        assert shared is None and gate is None
    if model_type == "deepseek_v3":
        assert bias is block.gate.e_score_correction_bias and tuple(bias.shape) == (8,)
    else:
        assert bias is None


def test_read_write_round_trip_is_exact_and_touches_only_that_slice(tiny_model):
    adapter = adapter_for(tiny_model)
    layer = max(adapter.moe_layers(tiny_model))
    target = ExpertId(layer, 5)
    before = {n: t.clone() for n, t in tiny_model.state_dict().items()}

    original = adapter.read_expert(tiny_model, target)
    adapter.write_expert(tiny_model, target, original)
    assert all(torch.equal(before[n], t) for n, t in tiny_model.state_dict().items())

    original["down_proj"].zero_()  # a read is a copy: changing it leaves the model alone
    assert not torch.equal(adapter.read_expert(tiny_model, target)["down_proj"], original["down_proj"])

    new = {n: torch.randn_like(t) for n, t in adapter.read_expert(tiny_model, target).items()}
    adapter.write_expert(tiny_model, target, new)
    got = adapter.read_expert(tiny_model, target)
    assert all(torch.equal(got[n], new[n]) for n in new)

    fused = {s.name: s for s in adapter.expert_param_slices(tiny_model)}
    changed = 0
    for name, tensor in tiny_model.state_dict().items():
        if name in fused and fused[name].layer == layer:
            keep = torch.ones(tensor.shape[0], dtype=torch.bool)
            keep[target.expert] = False
            assert torch.equal(tensor[keep], before[name][keep]), name
            assert not torch.equal(tensor[target.expert], before[name][target.expert]), name
            changed += 1
        else:
            assert torch.equal(tensor, before[name]), name
    assert changed == 2  # gate_up_proj and down_proj of that layer


def test_expert_param_slices_name_every_fused_tensor(tiny_model, expected_moe_layers):
    adapter = adapter_for(tiny_model)
    slices = adapter.expert_param_slices(tiny_model)
    params = dict(tiny_model.named_parameters())
    assert [(s.layer, s.name.rsplit(".", 1)[-1]) for s in slices] == [
        (layer, name) for layer in expected_moe_layers for name in ("gate_up_proj", "down_proj")
    ]
    for s in slices:
        assert params[s.name] is s.param and s.expert_dim == 0 and s.param.shape[0] == 8
        assert f"layers.{s.layer}." in s.name


def test_count_parameters_adds_up(tiny_model, expected_moe_layers):
    adapter = adapter_for(tiny_model)
    count = adapter.count_parameters(tiny_model)
    block = adapter.moe_layers(tiny_model)[expected_moe_layers[0]]
    inter = adapter.expert_parameters(block)["down_proj"].shape[-1]
    assert count.per_expert == 3 * 64 * inter  # gate, up, down
    assert count.num_routed_experts == 8 * len(expected_moe_layers)
    assert count.non_expert + count.num_routed_experts * count.per_expert == tiny_model.num_parameters()
    assert count.non_expert > 0


def test_write_expert_refuses_bad_tensors_with_clear_errors(tiny_builder):
    model = tiny_builder("qwen3_moe")
    adapter = adapter_for(model)
    good = adapter.read_expert(model, (1, 3))
    with pytest.raises(ExpertAddressError) as err:
        adapter.write_expert(model, (1, 3), {"down_proj": good["down_proj"], "up_proj": good["down_proj"]})
    assert str(err.value) == (
        "write_expert(1, 3): missing tensors ['gate_up_proj'], unexpected tensors ['up_proj']; "
        "expected exactly ['down_proj', 'gate_up_proj']"
    )
    with pytest.raises(ExpertAddressError) as err:
        adapter.write_expert(model, (1, 3), {**good, "down_proj": good["down_proj"].T})
    assert str(err.value) == "write_expert(1, 3): 'down_proj' has shape (32, 64), expected (64, 32)"
    with pytest.raises(ExpertAddressError) as err:
        adapter.write_expert(model, (1, 3), {**good, "down_proj": good["down_proj"].half()})
    assert str(err.value) == (
        "write_expert(1, 3): 'down_proj' has dtype torch.float16, expected torch.float32 "
        "(cast it first; write_expert never changes precision silently)"
    )
    with pytest.raises(ExpertAddressError, match=r"^expert 8 is out of range: layer 1 has 8 routed experts \(0..7\)$"):
        adapter.read_expert(model, (1, 8))


def test_dense_layers_are_found_by_looking(tiny_builder):
    """Qwen3-MoE's mlp_only_layers makes layer 1 dense: it is left out and refused as an address."""
    model = tiny_builder("qwen3_moe", mlp_only_layers=[1])
    adapter = adapter_for(model)
    assert sorted(adapter.moe_layers(model)) == [0, 2]
    assert adapter.empty_mask(model).moe_layers == (0, 2)
    with pytest.raises(
        ExpertAddressError, match=r"^layer 1 is a dense layer \(no MoE block\); the MoE layers are \[0, 2\]$"
    ):
        adapter.read_expert(model, (1, 0))


def test_deepseek_dense_first_layer_is_refused(tiny_builder):
    model = tiny_builder("deepseek_v3")
    with pytest.raises(
        ExpertAddressError, match=r"^layer 0 is a dense layer \(no MoE block\); the MoE layers are \[1, 2\]$"
    ):
        adapter_for(model).write_expert(model, (0, 0), {})


def test_unknown_family_names_the_supported_ones():
    llama = nn.Module()
    llama.config = type("Config", (), {"model_type": "llama"})()
    with pytest.raises(ValueError) as err:
        adapter_for(llama)
    assert str(err.value) == (
        "no expert adapter for model_type 'llama'. Supported families: deepseek_v2, deepseek_v3, flex_olmo, mixtral, "
        "olmoe, qwen2_moe, qwen3_moe. Register one with connito.experts.register_adapter."
    )


def test_register_adapter_refuses_silent_override():
    with pytest.raises(ValueError, match="already registered; pass replace=True"):
        register_adapter("mixtral", MoEAdapter("mixtral", MoELayout()))
    assert adapter_for("mixtral").layout.num_experts_key == "num_local_experts"
