"""The expert view on real tiny transformers models (unsharded layout): where experts are, exact read/write,
router rows, choice bias, counts, and the exact errors for addresses and tensors that do not fit."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from connito.experts import ExpertAddressError, ExpertId, ExpertView
from connito.models import Family, ModelError, get_family, register_family


def test_finds_moe_layers_and_router_settings(tiny_model, model_type, expected_moe_layers):
    view = ExpertView(tiny_model)
    assert view.family.model_type == model_type
    assert view.moe_layers == expected_moe_layers
    assert view.dense_layers == [i for i in range(3) if i not in expected_moe_layers]
    assert (view.num_layers, view.num_experts, view.top_k, view.ep_size) == (3, 8, 2, 1)
    for layer, block in view.blocks():
        assert block.router_module.top_k == 2
        assert tuple(view.router_weight(layer).shape) == (8, 64)  # [E, H]
        params = block.stacked_params()
        inter = params["down_proj"].shape[-1]
        assert tuple(params["gate_up_proj"].shape) == (8, 2 * inter, 64)  # [E, 2I, H]
        assert tuple(params["down_proj"].shape) == (8, 64, inter)  # [E, H, I]
        assert view.local_experts(layer) == list(range(8)) and view.owner((layer, 7)) == 0


def test_shared_experts_and_choice_bias(tiny_model, model_type):
    view = ExpertView(tiny_model)
    layer = view.moe_layers[0]
    block = view.block(layer).module
    shared, gate, bias = view.shared_experts(layer), view.shared_expert_gate(layer), view.choice_bias(layer)
    if model_type == "qwen2_moe":
        assert shared is block.shared_expert and gate is block.shared_expert_gate
        assert tuple(gate.weight.shape) == (1, 64)
    elif model_type.startswith("deepseek"):
        assert shared is block.shared_experts and gate is None
    else:
        assert shared is None and gate is None
    if model_type == "deepseek_v3":
        assert bias is block.gate.e_score_correction_bias and tuple(bias.shape) == (8,)
        new = torch.arange(8, dtype=bias.dtype)
        view.write_choice_bias(layer, new)
        assert torch.equal(block.gate.e_score_correction_bias, new)
    else:
        assert bias is None
        with pytest.raises(ExpertAddressError, match="routers have no choice bias"):
            view.write_choice_bias(layer, torch.zeros(8))


def test_read_write_round_trip_is_exact_and_touches_only_that_slice(tiny_model):
    view = ExpertView(tiny_model)
    layer = view.moe_layers[-1]
    target = ExpertId(layer, 5)
    before = {n: t.clone() for n, t in tiny_model.state_dict().items()}

    original = view.read_expert(target)
    view.write_expert(target, original)
    assert all(torch.equal(before[n], t) for n, t in tiny_model.state_dict().items())

    original["down_proj"].zero_()  # a read is a copy: changing it leaves the model alone
    assert not torch.equal(view.read_expert(target)["down_proj"], original["down_proj"])

    new = {n: torch.randn_like(t) for n, t in view.read_expert(target).items()}
    view.write_expert(target, new)
    got = view.read_expert(target)
    assert all(torch.equal(got[n], new[n]) for n in new)

    stacked = {s.name: s for s in view.expert_param_slices()}
    changed = 0
    for name, tensor in tiny_model.state_dict().items():
        if name in stacked and stacked[name].layer == layer:
            keep = torch.ones(tensor.shape[0], dtype=torch.bool)
            keep[target.expert] = False
            assert torch.equal(tensor[keep], before[name][keep]), name
            assert not torch.equal(tensor[target.expert], before[name][target.expert]), name
            changed += 1
        else:
            assert torch.equal(tensor, before[name]), name
    assert changed == 2  # gate_up_proj and down_proj of that layer


def test_expert_param_slices_name_every_stacked_tensor(tiny_model, expected_moe_layers):
    view = ExpertView(tiny_model)
    slices = view.expert_param_slices()
    params = dict(tiny_model.named_parameters())
    assert [(s.layer, s.name.rsplit(".", 1)[-1]) for s in slices] == [
        (layer, name) for layer in expected_moe_layers for name in ("gate_up_proj", "down_proj")
    ]
    for s in slices:
        assert params[s.name] is s.param and s.expert_dim == 0 and s.experts == range(8)
        assert f"layers.{s.layer}." in s.name


def test_count_parameters_adds_up(tiny_model, expected_moe_layers):
    view = ExpertView(tiny_model)
    count = view.count_parameters()
    inter = view.block(expected_moe_layers[0]).stacked_params()["down_proj"].shape[-1]
    assert count.per_expert == 3 * 64 * inter  # gate, up, down
    assert count.num_routed_experts == 8 * len(expected_moe_layers)
    assert count.non_expert + count.num_routed_experts * count.per_expert == tiny_model.num_parameters()
    assert count.non_expert > 0


def test_router_rows_read_write_add_remove(tiny_builder):
    model = tiny_builder("qwen3_moe")
    view = ExpertView(model)
    router = view.read_router(1)
    rows = torch.randn(2, 64)
    view.write_router_rows(1, [3, 6], rows)
    assert torch.equal(view.router_weight(1)[[3, 6]], rows)
    keep = [e for e in range(8) if e not in (3, 6)]
    assert torch.equal(view.router_weight(1)[keep], router[keep])

    added = view.add_router_rows(1, torch.ones(3, 64))
    assert added == [8, 9, 10] and tuple(view.router_weight(1).shape) == (11, 64)
    assert view.block(1).router_module.num_experts == 11
    view.remove_router_rows(1, added)
    assert torch.equal(view.router_weight(1)[keep], router[keep])
    view.remove_router_rows(1, [0])  # experts renumber in order
    assert torch.equal(view.router_weight(1)[0], router[1])
    assert tuple(view.router_weight(0).shape) == (8, 64)  # other layers untouched

    with pytest.raises(ExpertAddressError) as err:
        view.write_router_rows(2, [0], torch.ones(2, 64))
    assert (
        str(err.value) == "write_router_rows(layer 2): rows are torch.float32 (2, 64), expected torch.float32 (1, 64)"
    )
    with pytest.raises(ExpertAddressError, match=r"fewer than top-k 2$"):
        view.remove_router_rows(2, list(range(7)))


def test_write_expert_refuses_bad_tensors_with_clear_errors(tiny_builder):
    model = tiny_builder("qwen3_moe")
    view = ExpertView(model)
    good = view.read_expert((1, 3))
    with pytest.raises(ExpertAddressError) as err:
        view.write_expert((1, 3), {"down_proj": good["down_proj"], "up_proj": good["down_proj"]})
    assert str(err.value) == (
        "write_expert(1, 3): missing tensors ['gate_up_proj'], unexpected tensors ['up_proj']; "
        "expected exactly ['down_proj', 'gate_up_proj']"
    )
    with pytest.raises(ExpertAddressError) as err:
        view.write_expert((1, 3), {**good, "down_proj": good["down_proj"].T})
    assert str(err.value) == "write_expert(1, 3): 'down_proj' has shape (32, 64), expected (64, 32)"
    with pytest.raises(ExpertAddressError) as err:
        view.write_expert((1, 3), {**good, "down_proj": good["down_proj"].half()})
    assert str(err.value) == (
        "write_expert(1, 3): 'down_proj' has dtype torch.float16, expected torch.float32 "
        "(cast it first; write_expert never changes precision silently)"
    )
    with pytest.raises(ExpertAddressError, match=r"^expert 8 is out of range: layer 1 has 8 routed experts \(0..7\)$"):
        view.read_expert((1, 8))


def test_dense_layers_are_found_by_looking(tiny_builder):
    """Qwen3-MoE's mlp_only_layers makes layer 1 dense: it is left out and refused as an address."""
    model = tiny_builder("qwen3_moe", mlp_only_layers=[1])
    view = ExpertView(model)
    assert view.moe_layers == [0, 2] and view.dense_layers == [1]
    assert view.empty_mask().moe_layers == (0, 2)
    with pytest.raises(
        ExpertAddressError, match=r"^layer 1 is a dense layer \(no MoE block\); the MoE layers are \[0, 2\]$"
    ):
        view.read_expert((1, 0))
    with pytest.raises(ExpertAddressError, match=r"^layer 1 is a dense layer"):
        view.router_weight(1)


def test_qwen2_moe_decoder_sparse_step_leaves_every_other_layer_dense(tiny_builder):
    model = tiny_builder("qwen2_moe", decoder_sparse_step=2)
    assert ExpertView(model).moe_layers == [1]


def test_deepseek_dense_first_layer_is_refused(tiny_builder):
    model = tiny_builder("deepseek_v3")
    with pytest.raises(
        ExpertAddressError, match=r"^layer 0 is a dense layer \(no MoE block\); the MoE layers are \[1, 2\]$"
    ):
        ExpertView(model).write_expert((0, 0), {})


def test_a_dense_model_has_no_experts_to_view():
    config = AutoConfig.for_model("llama", vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64)  # fmt: skip
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ExpertAddressError, match=r"^LlamaForCausalLM \(llama\) is a dense model: it has no experts"):
        ExpertView(model)


def test_an_unknown_family_names_the_known_ones():
    config = AutoConfig.for_model("gpt2", vocab_size=64, n_embd=32, n_layer=1, n_head=2)
    with pytest.raises(ModelError) as err:
        ExpertView(AutoModelForCausalLM.from_config(config))
    message = str(err.value)
    assert message.startswith("model family 'gpt2' is not one Connito knows. Known families: connito_bam_mixtral, ")
    assert ", deepseek_v2, " in message and ", qwen3_moe" in message  # Connito's own classes, then transformers'
    assert "register yours with connito.models.register_family" in str(err.value)


def test_register_family_refuses_silent_override():
    with pytest.raises(ValueError, match="already registered; pass replace=True"):
        register_family(Family("mixtral"))
    assert get_family("mixtral").layout.num_experts_key == "num_local_experts"
