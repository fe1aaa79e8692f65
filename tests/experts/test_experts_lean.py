"""Lean experts (connito.experts.lean): the trainable experts of a fused expert tensor as compact slots.

The contract, on every family, fp32: the forward equals transformers' ``grouped_mm`` path; the backward gives every
input the gradient the plain path gives and the slots exactly the gradient rows the plain path gives their experts;
the fused tensors (every frozen expert) get no gradient, so AdamW keeps state for the slots alone; the model's
``state_dict``/``save_pretrained`` stay in the family's format, show the trained values, and load into plain
transformers.
"""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from connito.experts import ExpertMask, ExpertView
from connito.experts.lean import lean_slots
from connito.experts.lean.install import EXPERTS_IMPLEMENTATION, LeanExpertsError, install
from tests.experts.conftest import build_tiny

TOL = {"rtol": 1e-6, "atol": 1e-6}
GRAD_TOL = {"rtol": 1e-5, "atol": 1e-6}  # dW summed over rows in another order (a loop per expert vs grouped_mm)


def chosen_experts(view) -> list[tuple[int, int]]:
    """Two experts in the first MoE layer, one in the second, none in the third (if any): a partial mask."""
    layers = view.moe_layers
    return [(layers[0], 1), (layers[0], 6), (layers[1], 3)]


def lean_and_reference(model_type: str):
    reference = build_tiny(model_type).train()
    reference.config._experts_implementation = "grouped_mm"
    model = copy.deepcopy(reference)
    view = ExpertView(model)
    experts = chosen_experts(view)
    mask = ExpertMask.from_ids(experts, view.num_layers, view.num_experts, view.moe_layers)
    report = install(model, mask)
    return model, reference, experts, report


def batch(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(seed))


def loss_of(model, ids) -> tuple[torch.Tensor, torch.Tensor]:
    out = model(input_ids=ids, labels=ids)
    return out.loss, out.logits


def fused_names(model, layer: int) -> list[str]:
    view = ExpertView(model)
    block = dict(view.blocks())[layer]
    experts_attr = f"{block.prefix}.{block.layout.experts_attr}"
    return [f"{experts_attr}.gate_up_proj", f"{experts_attr}.down_proj"]


def test_forward_and_gradients_equal_the_grouped_mm_path_and_only_slots_get_expert_gradients(model_type):
    model, reference, experts, report = lean_and_reference(model_type)
    assert report.layers == sorted({layer for layer, _ in experts}) and report.slots == len(experts)
    assert model.config._experts_implementation == EXPERTS_IMPLEMENTATION
    ids = batch()
    loss, logits = loss_of(model, ids)
    ref_loss, ref_logits = loss_of(reference, ids)
    torch.testing.assert_close(logits, ref_logits, **TOL)
    loss.backward()
    ref_loss.backward()

    reference_params = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        if ".lean_experts." in name:
            continue
        expected = reference_params[name].grad
        if not param.requires_grad:  # the fused tensors of the lean layers: storage, no gradient buffer
            assert param.grad is None, name
            continue
        assert expected is not None and param.grad is not None, name
        torch.testing.assert_close(param.grad, expected, **GRAD_TOL, msg=name)
    for slots in lean_slots(model):
        gate_up_name, down_name = fused_names(model, slots.layer)
        for g, expert in enumerate(slots.global_ids):
            torch.testing.assert_close(
                slots.gate_up_proj.grad[g], reference_params[gate_up_name].grad[expert], **GRAD_TOL
            )
            torch.testing.assert_close(slots.down_proj.grad[g], reference_params[down_name].grad[expert], **GRAD_TOL)
        assert slots.gate_up_proj.grad.abs().sum() > 0  # the chosen experts were routed to
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert sorted(frozen) == sorted(n for layer in report.layers for n in fused_names(model, layer))


def test_adamw_holds_state_for_the_slots_alone_and_frozen_rows_stay_bit_identical():
    model, _, experts, report = lean_and_reference("qwen3_moe")
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    # the chosen experts (their slots) and everything outside the expert tensors; no expert of the last layer
    trainable = [p for n, p in model.named_parameters() if p.requires_grad and ".mlp.experts." not in n]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1)
    for step in range(3):
        model(input_ids=batch(step), labels=batch(step)).loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 0.05)
        optimizer.step()
        optimizer.zero_grad()
    slot_numel = sum(p.numel() for s in lean_slots(model) for p in s.parameters())
    fused_numel = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    slot_ids = {id(p) for slots in lean_slots(model) for p in slots.parameters()}
    expert_state = sum(s["exp_avg"].numel() for p, s in optimizer.state.items() if id(p) in slot_ids)
    assert expert_state == slot_numel == report.slot_numel and slot_numel * 8 <= fused_numel
    assert not any(not p.requires_grad for p in optimizer.state)

    final = model.state_dict()
    assert not any(".lean_experts." in key for key in final)  # the family's own keys only
    chosen = {}
    for layer, expert in experts:
        chosen.setdefault(layer, []).append(expert)
    for key, before in initial.items():
        layer = int(key.split(".")[2]) if key.startswith("model.layers.") else None
        if ".mlp.experts." not in key:
            continue
        mine = chosen.get(layer, [])
        frozen = [e for e in range(before.shape[0]) if e not in mine]
        assert torch.equal(final[key][frozen], before[frozen]), key
        for expert in mine:  # the trained values, synced into the fused rows
            assert not torch.equal(final[key][expert], before[expert]), (key, expert)


def test_a_lean_model_saves_in_the_family_format_and_loads_back_into_plain_transformers(tmp_path, model_type):
    model, _, _, _ = lean_and_reference(model_type)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    model(input_ids=batch(), labels=batch()).loss.backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch(1)).logits
    model.save_pretrained(tmp_path)
    assert EXPERTS_IMPLEMENTATION not in (tmp_path / "config.json").read_text()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="grouped_mm").eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=batch(1)).logits, logits, **TOL)


def test_load_state_dict_takes_the_slots_from_the_loaded_fused_rows():
    model, reference, experts, _ = lean_and_reference("mixtral")
    other = build_tiny("mixtral", seed=7)
    result = model.load_state_dict(other.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    for slots in lean_slots(model):
        gate_up_name, _ = fused_names(model, slots.layer)
        expected = dict(other.named_parameters())[gate_up_name][slots.global_ids]
        assert torch.equal(slots.gate_up_proj.detach(), expected)
    other.config._experts_implementation = "grouped_mm"
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=batch()).logits, other(input_ids=batch()).logits, **TOL)


def test_a_forward_with_substituted_parameters_runs_the_plain_path_and_gives_the_slots_no_gradient():
    """DES-MoE's per-token masks call the model through torch.func.functional_call with detached weights."""
    model, reference, _, _ = lean_and_reference("qwen3_moe")
    params = {n: p.detach() for n, p in model.named_parameters() if ".lean_experts." not in n}
    out = torch.func.functional_call(model, params, args=(), kwargs={"input_ids": batch()})
    with torch.no_grad():
        torch.testing.assert_close(out.logits, reference(input_ids=batch()).logits, **TOL)
    assert not out.logits.requires_grad


def test_an_experts_module_of_another_layout_is_refused_with_the_fallback_named():
    model = build_tiny("qwen3_moe")
    view = ExpertView(model)
    block = dict(view.blocks())[0]
    block.experts_module.is_transposed = True
    mask = ExpertMask.from_ids([(0, 1)], view.num_layers, view.num_experts, view.moe_layers)
    with pytest.raises(LeanExpertsError, match=r"callbacks\.trainable\.lean=false"):
        install(model, mask)


def test_layers_training_all_or_none_of_their_experts_get_no_slots():
    model = build_tiny("olmoe")
    view = ExpertView(model)
    ids = [(0, e) for e in range(view.num_experts)] + [(1, 2)]
    report = install(model, ExpertMask.from_ids(ids, view.num_layers, view.num_experts, view.moe_layers))
    assert report.layers == [1]
    assert all(p.requires_grad for n, p in model.named_parameters() if n.startswith("model.layers.0.mlp.experts."))
