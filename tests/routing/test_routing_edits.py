"""Router edits change routing exactly as documented, in both layouts, and change nothing at zero.

For every family on a tiny transformers model: a zero edit (and every neutral row block of a batched edit) leaves
the logits bit-identical and the edit comes off cleanly; :class:`RoutingRule` reproduces each family's router bit
for bit at zero bias; a large logit bias makes every token choose the expert (DeepSeek-V3: only without a group
limit, since sigmoid saturates, unlike its choice bias). ExpertWeightScale changes only the tokens that chose the
expert, and the block output equals the recombination of the experts with the weights written out by hand
(renormalised or not, scaled or not). On DeepSpeed AutoEP layers (ep 1, in process) both edits give the
transformers result.
"""

import pytest
import torch

from connito.experts import ExpertView
from connito.routing import RouterObserver
from connito.routing.edits import ExpertWeightScale, RouterLogitBias, routing_rule
from tests.experts.conftest import TINY, build_tiny
from tests.routing.observe_worker import read_all_experts, recombine

FAMILIES = sorted(TINY)
RENORMALISES = {"qwen3_moe": False, "deepseek_v2": False, "mixtral": True, "deepseek_v3": True}
"""What transformers' routers do with the tiny configs (written from modeling_*.py, not from the code under test)."""


def random_choice_bias(model, scale: float = 0.1) -> None:
    """DeepSeek-V3's choice bias is zeros at init: give it random values so that ignoring it would show."""
    view = ExpertView(model)
    generator = torch.Generator().manual_seed(11)
    for layer in view.moe_layers:
        bias = view.choice_bias(layer)
        if bias is not None:
            view.write_choice_bias(layer, scale * torch.randn(bias.shape, generator=generator))


def input_ids(model, rows: int = 2, seq: int = 16, seed: int = 7) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (rows, seq), generator=generator)


def routed(model, view, ids) -> tuple[torch.Tensor, dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """Logits, and per MoE layer the (ids_TK, weights_TK) the blocks used."""
    observer, records = RouterObserver(model, view), {}
    observer.subscribe(lambda r: records.__setitem__(r.layer, (r.topk_ids_TK, r.topk_weights_TK)))
    with torch.no_grad():
        logits = model(ids).logits
    observer.close()
    return logits, records


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_edits_are_the_identity_and_come_off(family):
    model = build_tiny(family)
    random_choice_bias(model)
    view = ExpertView(model)
    ids = input_ids(model)
    with torch.no_grad():
        plain = model(ids).logits
        shape = (len(view.moe_layers), view.num_experts)
        with RouterLogitBias(model, torch.zeros(shape), view=view):
            biased = model(ids).logits
        with ExpertWeightScale(model, torch.ones(shape), view=view) as edit:
            scaled = model(ids).logits
            assert all(len(block.router_module._forward_hooks) == 1 for _, block in view.blocks())
        edit.remove()  # a second remove is harmless
        with RouterLogitBias(model, {(view.moe_layers[0], 1): 3.0}, view=view):
            assert not torch.equal(model(ids).logits, plain)
        after = model(ids).logits
    assert torch.equal(biased, plain) and torch.equal(scaled, plain) and torch.equal(after, plain)
    assert all(len(block.router_module._forward_hooks) == 0 for _, block in view.blocks())


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v3"])
@pytest.mark.parametrize("edit_class", [ExpertWeightScale, RouterLogitBias])
def test_neutral_row_blocks_keep_the_routing_and_the_edited_block_is_the_edit_alone(family, edit_class):
    """Batch replicated 3 times, values [3, M, E]: copies 0 and 2 neutral, copy 1 edited on one expert per layer.
    The neutral copies' routing in the first MoE layer is bit-identical to the unedited replicated batch. Where no
    expert's group size changed (a weight scale never changes a choice in the layer it edits, but copy 1's changed
    hidden states may change its choices in later layers), their routing in every layer and their logits are
    bit-identical too; otherwise the experts' grouped matmuls run on other sizes, which CPU kernels may round
    differently (~1e-6), and the logits are close. Copy 1 equals the edit alone."""
    model = build_tiny(family)
    random_choice_bias(model)
    view = ExpertView(model)
    ids = input_ids(model)
    values = torch.full((3, len(view.moe_layers), view.num_experts), edit_class.neutral)
    values[1, :, 2] = 4.0 if edit_class is ExpertWeightScale else 2.0
    batch = ids.repeat(3, 1)
    plain, plain_routing = routed(model, view, batch)
    with edit_class(model, values, view=view):
        copies, routing = routed(model, view, batch)
    with edit_class(model, values[1], view=view):
        edited, _ = routed(model, view, ids)
    neutral_T = torch.ones(3, ids.numel(), dtype=torch.bool)
    neutral_T[1] = False
    neutral_T = neutral_T.flatten()
    # Copy 1's changed hidden states may change its own choices in later layers, hence the sizes of the experts'
    # grouped matmuls, which CPU kernels may round differently (~1e-6) for the other copies. Exact where no group
    # size changed (every layer under a weight scale whose copy 1 kept its choices; the first layer always).
    same_sizes = all(
        torch.equal(
            routing[layer][0][~neutral_T].sort(dim=-1).values, plain_routing[layer][0][~neutral_T].sort(dim=-1).values
        )
        for layer in view.moe_layers
    )
    exact = edit_class is ExpertWeightScale and same_sizes
    for layer in view.moe_layers if exact else view.moe_layers[:1]:
        for got, expected in zip(routing[layer], plain_routing[layer]):
            assert torch.equal(got[neutral_T], expected[neutral_T]), f"layer {layer}"
    plain, copies = plain.view(3, *ids.shape, -1), copies.view(3, *ids.shape, -1)
    for copy in (0, 2):
        if exact:
            assert torch.equal(copies[copy], plain[copy])
        else:
            torch.testing.assert_close(copies[copy], plain[copy], rtol=1e-5, atol=1e-5)
    assert (copies[1] - plain[1]).abs().max() > 1e-3
    torch.testing.assert_close(copies[1], edited, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="do not split into 3 equal row blocks"):
        with edit_class(model, values, view=view), torch.no_grad():
            model(ids)  # 32 tokens, 3 blocks


@pytest.mark.parametrize("family", FAMILIES)
def test_routing_rule_reproduces_every_family_router_at_zero_bias(family):
    """``RoutingRule.route(logits)`` == the router's own (ids, weights), bit for bit (DeepSeek-V3 with a random
    choice bias and group-limited choice; the rest softmax top-k, renormalised or not)."""
    model = build_tiny(family)
    random_choice_bias(model)
    view = ExpertView(model)
    captured = {}
    handles = [
        block.router_module.register_forward_hook(lambda m, a, out, layer=layer: captured.__setitem__(layer, out))
        for layer, block in view.blocks()
    ]
    with torch.no_grad():
        model(input_ids(model))
    for handle in handles:
        handle.remove()
    assert sorted(captured) == view.moe_layers
    for layer, (logits_TE, weights_TK, ids_TK) in captured.items():
        rule_weights_TK, rule_ids_TK = routing_rule(view, layer).route(logits_TE)
        assert torch.equal(rule_ids_TK, ids_TK), f"layer {layer}"
        assert torch.equal(rule_weights_TK.to(weights_TK.dtype), weights_TK), f"layer {layer}"
        assert ids_TK.unique().numel() > 2


@pytest.mark.parametrize("family", FAMILIES)
def test_large_logit_bias_makes_every_token_choose_the_expert(family):
    """+50 on expert 5's logit in every layer: every token of every layer chooses it, and it carries nearly all
    the routing mass (softmax: probability ~1). DeepSeek-V3 without a group limit (see the next test)."""
    overrides = {"n_group": 1, "topk_group": 1} if family == "deepseek_v3" else {}
    model = build_tiny(family, **overrides)
    view = ExpertView(model)
    ids = input_ids(model)
    _, before = routed(model, view, ids)
    assert not all((layer_ids == 5).any(dim=-1).all() for layer_ids, _ in before.values())
    with RouterLogitBias(model, {(layer, 5): 50.0 for layer in view.moe_layers}, view=view):
        _, after = routed(model, view, ids)
    for layer, (ids_TK, weights_TK) in after.items():
        assert (ids_TK == 5).any(dim=-1).all(), f"layer {layer}"
        if family != "deepseek_v3":  # softmax: the biased expert holds the whole probability mass
            mass = weights_TK[ids_TK == 5] / routing_rule(view, layer).scale
            torch.testing.assert_close(mass, torch.ones_like(mass))


def test_deepseek_v3_logit_bias_saturates_unlike_its_choice_bias():
    """Group-limited DeepSeek-V3 (2 groups, 1 kept): +50 on the logit lifts sigmoid to at most 1, so the other
    group can still win and some tokens do not choose the expert, and its weight becomes the saturated score; +50 on
    the choice bias (e_score_correction_bias) makes every token choose it and leaves its weight sigmoid(logit)."""
    model = build_tiny("deepseek_v3")
    view = ExpertView(model)
    ids = input_ids(model, rows=4)
    with RouterLogitBias(model, {(layer, 5): 50.0 for layer in view.moe_layers}, view=view):
        _, by_logit = routed(model, view, ids)
    for layer in view.moe_layers:
        bias = torch.zeros(view.num_experts)
        bias[5] = 50.0
        view.write_choice_bias(layer, bias)
    _, by_choice_bias = routed(model, view, ids)
    chose_by_logit = torch.cat([(i == 5).any(dim=-1) for i, _ in by_logit.values()])
    assert 0 < chose_by_logit.sum() < chose_by_logit.numel()
    assert all((i == 5).any(dim=-1).all() for i, _ in by_choice_bias.values())
    layer = view.moe_layers[0]
    (ids_l, weights_l), (choice_ids, choice_weights) = by_logit[layer], by_choice_bias[layer]
    unbiased_logits = router_logits(model, view, ids)[layer]
    sigmoid_e = unbiased_logits[:, 5].sigmoid()
    scale = model.config.routed_scaling_factor
    # choice bias: the weight is the unbiased score, renormalised over the token's chosen scores, times the scale
    chosen_scores = unbiased_logits.sigmoid().gather(1, choice_ids)
    expected = scale * sigmoid_e / chosen_scores.sum(dim=-1)
    torch.testing.assert_close(choice_weights[choice_ids == 5], expected, rtol=1e-5, atol=1e-6)
    # logit bias: the score of the expert is sigmoid(l + 50) = 1 where it was chosen
    rows = (ids_l == 5).any(dim=-1)
    others = ids_l[rows][ids_l[rows] != 5].view(int(rows.sum()), -1)
    expected = scale / (1 + unbiased_logits[rows].sigmoid().gather(1, others).sum(dim=-1))
    torch.testing.assert_close(weights_l[rows][ids_l[rows] == 5], expected, rtol=1e-5, atol=1e-6)


def router_logits(model, view, ids) -> dict[int, torch.Tensor]:
    observer, logits = RouterObserver(model, view), {}
    observer.subscribe(lambda r: logits.__setitem__(r.layer, r.logits_TE.detach()))
    with torch.no_grad():
        model(ids)
    observer.close()
    return logits


@pytest.mark.parametrize("family", sorted(RENORMALISES))
def test_weight_scale_changes_only_tokens_routed_to_the_expert_and_follows_the_rule(family):
    """Factor 3 on the last MoE layer's most used expert e. The block's input is unchanged; its output is
    bit-identical on every token that did not choose e and different on every token that did; the weights equal
    ``s * f_k p_k / sum_j f_j p_j`` (renormalising families) or ``s * f_k p_k`` (the others), p the family's scores
    (softmax; DeepSeek-V3 sigmoid), and recombining the experts with them gives the block's output."""
    overrides = {"routed_scaling_factor": 2.0} if family == "deepseek_v2" else {}
    model = build_tiny(family, **overrides)
    random_choice_bias(model)
    view = ExpertView(model)
    layer = view.moe_layers[-1]
    block = view.block(layer).module
    ids = input_ids(model)

    def run() -> dict:
        seen = {}
        hook = block.register_forward_hook(lambda m, args, out: seen.update(x=args[0].detach(), y=out.detach()))
        observer = RouterObserver(model, view)
        observer.subscribe(
            lambda r: (
                seen.update(logits=r.logits_TE, ids=r.topk_ids_TK, w=r.topk_weights_TK) if r.layer == layer else None
            )
        )
        with torch.no_grad():
            model(ids)
        hook.remove()
        observer.close()
        return seen

    plain = run()
    expert = int(plain["ids"].flatten().bincount(minlength=view.num_experts).argmax())
    with ExpertWeightScale(model, {(layer, expert): 3.0}, view=view):
        edited = run()

    assert torch.equal(edited["x"], plain["x"]) and torch.equal(edited["ids"], plain["ids"])
    chose_T = (plain["ids"] == expert).any(dim=-1)
    assert 0 < chose_T.sum() < chose_T.numel()
    hidden = plain["y"].shape[-1]
    y_plain, y_edited = plain["y"].reshape(-1, hidden), edited["y"].reshape(-1, hidden)
    assert torch.equal(y_edited[~chose_T], y_plain[~chose_T])
    assert ((y_edited[chose_T] - y_plain[chose_T]).abs().amax(dim=-1) > 1e-4).all()

    scores_TE = plain["logits"].sigmoid() if family == "deepseek_v3" else plain["logits"].softmax(dim=-1)
    p_TK = scores_TE.gather(1, plain["ids"])
    f_TK = torch.where(plain["ids"] == expert, 3.0, 1.0)
    scale = getattr(model.config, "routed_scaling_factor", 1.0)
    expected_TK = scale * f_TK * p_TK
    if RENORMALISES[family]:
        expected_TK = expected_TK / (f_TK * p_TK).sum(dim=-1, keepdim=True)
    torch.testing.assert_close(edited["w"], expected_TK, rtol=1e-5, atol=1e-6)
    x_TH = plain["x"].reshape(-1, hidden)
    rebuilt = recombine(view, layer, x_TH, plain["ids"], expected_TK, read_all_experts(view))
    torch.testing.assert_close(y_edited, rebuilt, rtol=1e-5, atol=1e-5)


def test_logit_bias_ln_f_equals_weight_scale_f_on_a_renormalising_softmax_family():
    """Mixtral (softmax, renormalised): where the chosen set does not change, bias ln(f) on an expert's logit and
    factor f on its weight give the same weights (exp(l + ln f) = f exp(l), the denominators cancel)."""
    model = build_tiny("mixtral")
    view = ExpertView(model)
    ids = input_ids(model, rows=4)
    target = {(layer, 2): 1.7 for layer in view.moe_layers}
    with ExpertWeightScale(model, target, view=view):
        _, scaled = routed(model, view, ids)
    with RouterLogitBias(model, {k: float(torch.tensor(f).log()) for k, f in target.items()}, view=view):
        _, biased = routed(model, view, ids)
    layer = view.moe_layers[0]  # the first layer sees the same input in both runs
    (ids_s, w_s), (ids_b, w_b) = scaled[layer], biased[layer]
    same = (ids_s == ids_b).all(dim=-1) & (ids_s == 2).any(dim=-1)
    assert same.sum() > 3 and not (ids_s == ids_b).all()  # the bias also changed some choices
    torch.testing.assert_close(w_b[same], w_s[same], rtol=1e-5, atol=1e-6)


def test_bad_values_are_refused_with_the_shape_or_range():
    model = build_tiny("qwen3_moe")
    view = ExpertView(model)
    with pytest.raises(ValueError, match=r"expected \[3, 8\] \(MoE layers \[0, 1, 2\] x experts\)"):
        ExpertWeightScale(model, torch.ones(4, 8), view=view)
    with pytest.raises(ValueError, match="factors must be >= 0"):
        ExpertWeightScale(model, {(1, 2): -1.0}, view=view)
    with pytest.raises(ValueError, match="must be finite"):
        RouterLogitBias(model, {(1, 2): float("inf")}, view=view)
    with pytest.raises(ValueError, match="expert 9 is out of range"):
        RouterLogitBias(model, {(1, 9): 1.0}, view=view)


# -- DeepSpeed AutoEP layers (ep 1, in this process) --------------------------------------------------------------


def autoep_model(family: str):
    from connito.training.distributed import select_accelerator

    select_accelerator()
    from deepspeed.module_inject.auto_ep import AutoEP
    from deepspeed.module_inject.auto_ep_config import AutoEPConfig

    model = build_tiny(family)
    random_choice_bias(model)
    auto_ep = AutoEP(model, AutoEPConfig(enabled=True, autoep_size=1, preset_model=family))
    auto_ep.replace_moe_layers(auto_ep.ep_parser(), ep_size=1, ep_rank=0)
    return model


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_edits_on_autoep_layers_give_the_transformers_result(family):
    hf = build_tiny(family)
    random_choice_bias(hf)
    autoep = autoep_model(family)
    hf_view, ep_view = ExpertView(hf), ExpertView(autoep)
    assert type(ep_view.block(ep_view.moe_layers[0])).__name__ == "AutoEPMoEBlock"
    ids = input_ids(hf)
    values = torch.ones(2, len(hf_view.moe_layers), hf_view.num_experts)
    values[1, :, 3] = 2.5
    values[1, -1, 6] = 0.0
    biases = torch.zeros(len(hf_view.moe_layers), hf_view.num_experts)
    biases[:, 1], biases[:, 4] = 1.5, -2.0
    batch = ids.repeat(2, 1)  # the weight scale's copy 0 is neutral, copy 1 edited; the bias edits both
    with torch.no_grad():
        plain = hf(ids).logits
        for edit_class, edit_values in ((ExpertWeightScale, values), (RouterLogitBias, biases)):
            with edit_class(hf, edit_values, view=hf_view):
                expected = hf(batch).logits
            with edit_class(autoep, edit_values, view=ep_view):
                got = autoep(batch).logits
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
            assert (got[ids.shape[0] :] - plain).abs().max() > 1e-3
