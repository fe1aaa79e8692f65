"""DES-MoE's adaptive router, distillation term and export on tiny models of every MoE family: bit-identical logits
at the start, the KL of its formula, the schedules of its weight, the linear fold and the exact sidecar."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from connito.adaptation.des_moe.distill import RouterDistillation, kd_schedule, register_kd_schedule, router_kl
from connito.adaptation.des_moe.export import (
    MANIFEST,
    SIDECAR,
    calibration_captures,
    fold_into_state_dict,
    fold_layer,
    load_adaptive_router,
    write_sidecar,
)
from connito.adaptation.des_moe.router import ADAPTER, AdaptiveRouters
from connito.experts import ExpertView
from connito.routing import RouterObserver
from connito.training.callbacks import CallbackError, LossTerm, MicroBatch
from connito.training.step import forward_loss
from tests.experts.conftest import TINY, build_tiny


def input_ids(rows: int = 2, seq: int = 16, seed: int = 7) -> torch.Tensor:
    return torch.randint(3, 128, (rows, seq), generator=torch.Generator().manual_seed(seed))


def routing(model, ids) -> tuple[torch.Tensor, dict]:
    """Model logits and every layer's (router logits, weights, ids) of one forward."""
    records = {}
    observer = RouterObserver(model)
    observer.subscribe(lambda r: records.__setitem__(r.layer, (r.logits_TE, r.topk_weights_TK, r.topk_ids_TK)))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    observer.close()
    return logits, records


def nudge(routers: AdaptiveRouters, scale: float = 0.5, seed: int = 3) -> None:
    """Give every adaptive MLP a non-zero output layer (as training would)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in routers.adapters.values():
            adapter.down.weight.copy_(torch.randn(adapter.down.weight.shape, generator=generator) * scale)
            adapter.down.bias.copy_(torch.randn(adapter.down.bias.shape, generator=generator) * scale)


@pytest.mark.parametrize("family", sorted(TINY))
def test_the_adaptive_router_starts_with_the_pretrained_logits_and_routing_bit_for_bit(family):
    model = build_tiny(family)
    if family == "deepseek_v3":  # a non-zero choice bias, so the rule's choice bias is exercised
        for _, block in ExpertView(model).blocks():
            block.choice_bias().copy_(torch.randn(block.choice_bias().shape) * 0.1)
    ids = input_ids()
    logits, records = routing(model, ids)
    routers = AdaptiveRouters(model, hidden_mult=4, seed=0)
    adapted_logits, adapted = routing(model, ids)
    assert torch.equal(adapted_logits, logits)
    for layer, (router_logits, weights, chosen) in records.items():
        assert all(torch.equal(a, b) for a, b in zip(adapted[layer], (router_logits, weights, chosen)))
    view = ExpertView(model)
    assert all(a.up.out_features == 4 * view.router_weight(layer).shape[1] for layer, a in routers.adapters.items())
    assert all(a.is_zero() for a in routers.adapters.values())
    # once the MLP has moved, the logits are the linear router's plus the MLP's output, routed by the family's rule
    nudge(routers)
    moved_logits, moved = routing(model, ids)
    assert not torch.equal(moved_logits, logits)
    layer = view.moe_layers[0]
    assert not torch.equal(moved[layer][0], records[layer][0])
    # taking it off restores the family's router (no adapter left, logits as before)
    routers.remove()
    assert not any(hasattr(block.router_module, ADAPTER) for _, block in view.blocks())
    assert torch.equal(routing(model, ids)[0], logits)


def test_the_adaptive_router_trains_with_the_router_and_its_names_stay_the_familys():
    model = build_tiny("qwen3_moe").train()
    AdaptiveRouters(model, hidden_mult=2, seed=0)
    names = [n for n, _ in model.named_parameters() if ".gate." in n]
    assert "model.layers.0.mlp.gate.weight" in names
    assert "model.layers.0.mlp.gate.adapter.down.weight" in names
    assert "model.layers.0.mlp.gate.adapter.up.weight" in names
    model(input_ids=input_ids()).logits.logsumexp(-1).mean().backward()
    down = model.model.layers[0].mlp.gate.adapter.down.weight
    assert down.grad is not None and down.grad.abs().sum() > 0  # the zero output layer learns from the first step


def test_the_distillation_term_is_zero_at_the_start_and_the_kl_of_its_formula_after():
    model = build_tiny("qwen3_moe").train()
    routers = AdaptiveRouters(model, seed=0)
    term = RouterDistillation(routers, tau=0.7)
    routers.capture = True
    batch = MicroBatch(input_ids(), torch.zeros(2, 16, dtype=torch.long), 0, 0)
    model(input_ids=batch.input_ids_BT)
    assert term(batch, None).item() == 0.0  # student == teacher exactly
    assert term(batch, None) is None  # captures are taken once
    nudge(routers, scale=0.2)
    model(input_ids=batch.input_ids_BT)
    captures = routers.take_captures()
    expected = []
    for capture in captures:
        teacher = capture.hidden_TH.detach() @ routers.teacher_weights[capture.layer].T
        p = torch.softmax(teacher / 0.7, -1)
        q = torch.softmax(capture.logits_TE / 0.7, -1)
        expected.append((p * (p.log() - q.log())).sum(-1).mean())
    routers._captures = captures
    value = term(batch, None)
    assert value.item() > 1e-4
    torch.testing.assert_close(value, torch.stack(expected).mean(), rtol=1e-5, atol=1e-7)
    value.backward()  # the teacher is a target: no gradient reaches the frozen copy
    assert all(not w.requires_grad for w in routers.teacher_weights.values())
    # evaluation forwards (no autograd) capture nothing
    with torch.no_grad():
        model(input_ids=batch.input_ids_BT)
    assert routers.take_captures() == []


def test_router_kl_matches_torch_kl_div_and_is_not_scaled_by_t_squared():
    teacher, student = torch.randn(5, 8), torch.randn(5, 8)
    expected = torch.nn.functional.kl_div(
        torch.log_softmax(student / 0.7, -1), torch.log_softmax(teacher / 0.7, -1), log_target=True,
        reduction="batchmean",
    )  # fmt: skip
    torch.testing.assert_close(router_kl(teacher, student, 0.7), expected)


def test_kd_weight_schedules():
    linear = kd_schedule("linear")
    assert [linear(p) for p in (0.0, 0.25, 0.5, 1.0, 1.5)] == [1.0, 0.75, 0.5, 0.0, 0.0]
    cosine = kd_schedule("cosine")
    assert cosine(0.0) == 1.0 and cosine(1.0) == pytest.approx(0.0) and cosine(0.5) == pytest.approx(0.5)
    knots = kd_schedule("piecewise", [[0.0, 1.0], [0.5, 0.2], [0.8, 0.0]])
    assert [knots(p) for p in (0.0, 0.25, 0.5, 0.65, 0.8, 0.9)] == pytest.approx([1.0, 0.6, 0.2, 0.1, 0.0, 0.0])
    assert kd_schedule("piecewise", [[0, 0.3], [1, 0.3]])(0.7) == 0.3
    register_kd_schedule("test_half", lambda p: 0.5 * max(0.0, 1 - p), replace=True)
    assert kd_schedule("test_half")(0.5) == 0.25
    with pytest.raises(CallbackError, match=r"kd_schedule='exp' is not one of cosine, linear, piecewise"):
        kd_schedule("exp")
    with pytest.raises(CallbackError, match=r"kd_knots=\[\[0.5, 1.0\], \[0.5, 0.0\]\]: give .* increasing progress"):
        kd_schedule("piecewise", [[0.5, 1], [0.5, 0]])
    with pytest.raises(CallbackError, match=r"kd_knots is set but kd_schedule=linear"):
        kd_schedule("linear", [[0, 1]])
    register_kd_schedule("test_bad", lambda p: 2.0, replace=True)
    with pytest.raises(CallbackError, match=r"gave lambda=2.0 at progress 0.1; it must be in \[0, 1\]"):
        kd_schedule("test_bad")(0.1)


def test_the_training_loss_mixes_task_and_distillation_by_the_task_weight():
    class Constant(LossTerm):
        name, coef = "kd", 0.25

        def __call__(self, batch, outputs):
            return torch.tensor(2.0)

    model = build_tiny("qwen3_moe")
    batch = MicroBatch(input_ids(), torch.zeros(2, 16, dtype=torch.long), 0, 0)
    plain, lm, _ = forward_loss(model, batch, [Constant()])
    assert torch.equal(plain, lm + 0.5)  # the default weight 1 leaves the task loss as it is
    mixed, lm, values = forward_loss(model, batch, [Constant()], task_weight=0.75)
    torch.testing.assert_close(mixed, 0.75 * lm + 0.25 * values["kd"])


def test_the_export_folds_exactly_while_the_mlp_output_is_zero():
    model = build_tiny("qwen2_moe")
    routers = AdaptiveRouters(model, seed=0)
    view = ExpertView(model)
    captures = calibration_captures(model, routers, input_ids(rows=4), micro_batch=2)
    assert sorted(captures) == view.moe_layers
    for layer in view.moe_layers:
        weight, fold = fold_layer(view, layer, routers, *captures[layer])
        assert fold.exact and fold.topk_agreement == 1.0 and fold.tokens == 64
        assert torch.equal(weight, view.router_weight(layer))
    state = dict(model.state_dict())
    fold_into_state_dict(state, view, {layer: view.router_weight(layer) + 1 for layer in view.moe_layers})
    assert not any(f".{ADAPTER}." in key for key in state)
    assert torch.equal(state["model.layers.0.mlp.gate.weight"], view.router_weight(0) + 1)


def test_the_least_squares_fold_recovers_a_linear_router_up_to_a_per_token_shift():
    model = build_tiny("qwen3_moe")
    routers = AdaptiveRouters(model, seed=0)
    nudge(routers)  # not exact any more: the least-squares path runs
    view = ExpertView(model)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(400, 64, generator=generator, dtype=torch.float64)
    true_EH = torch.randn(8, 64, generator=generator, dtype=torch.float64)
    logits = hidden @ true_EH.T + hidden[:, :1] * 3.0  # plus a per-token shift softmax ignores
    weight, fold = fold_layer(view, 0, routers, hidden, logits)
    assert not fold.exact and fold.topk_agreement == 1.0 and fold.logit_rmse < 1e-9
    centred = true_EH - true_EH.mean(0, keepdim=True)
    torch.testing.assert_close(weight.double(), centred, rtol=0, atol=1e-5)
    # a nonlinear target is approximated: the agreement is measured, not assumed
    weight, fold = fold_layer(view, 0, routers, hidden, logits + 4 * torch.tanh(hidden[:, :8]) ** 2)
    assert 0.0 < fold.topk_agreement < 1.0 and fold.logit_rmse > 0.1


def test_the_sidecar_puts_the_exact_adaptive_router_back_on_the_folded_export(tmp_path):
    model = build_tiny("mixtral")
    routers = AdaptiveRouters(model, seed=0)
    nudge(routers, scale=1.0)
    view = ExpertView(model)
    ids = input_ids(rows=3)
    trained_logits, _ = routing(model, ids)
    captures = calibration_captures(model, routers, input_ids(rows=16, seed=1), micro_batch=4)
    folded, folds = {}, []
    for layer in view.moe_layers:
        folded[layer], fold = fold_layer(view, layer, routers, *captures[layer])
        folds.append(fold)
    state = dict(model.state_dict())
    fold_into_state_dict(state, view, folded)
    model.save_pretrained(tmp_path, state_dict=state)
    write_sidecar(tmp_path, view, routers, folds, config={"note": "test"})
    assert (tmp_path / SIDECAR).is_file() and (tmp_path / MANIFEST).is_file()

    plain, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]  # plain transformers: the family's checkpoint
    plain_logits, _ = routing(plain.eval(), ids)
    assert not torch.equal(plain_logits, trained_logits)  # the folded router approximates
    load_adaptive_router(plain, tmp_path)
    restored_logits, _ = routing(plain, ids)
    torch.testing.assert_close(restored_logits, trained_logits, rtol=0, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="has no des_moe_router.json"):
        load_adaptive_router(build_tiny("mixtral"), tmp_path / "missing")


def test_top_k_agreement_is_the_share_of_tokens_with_the_same_expert_set():
    model = build_tiny("olmoe")
    routers = AdaptiveRouters(model, seed=0)
    nudge(routers)
    view = ExpertView(model)
    hidden = torch.randn(50, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    logits = torch.randn(50, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    weight, fold = fold_layer(view, 0, routers, hidden, logits)
    folded = hidden @ weight.double().T
    same = (logits.topk(2).indices.sort(-1).values == folded.topk(2).indices.sort(-1).values).all(-1)
    assert fold.topk_agreement == pytest.approx(same.double().mean().item())
    assert math.isfinite(fold.logit_rmse)
