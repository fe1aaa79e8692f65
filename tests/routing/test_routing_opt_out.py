"""FlexOLMo-style opt-out on tiny transformers models of every family.

The contract: a model under ``OptOut`` of some experts computes *bit for bit* (``torch.equal``) the logits of the
smaller model ``remove_experts`` builds without them, which plain transformers saves and reloads unchanged. Exact
equality is achievable because the opt-out hook recomputes the kept experts' router logits with the smaller
router's own matmul and routes them with the family's rule; the expert matmuls only see renumbered slices of the
same tensors. Opting nothing out is the identity; what no smaller model could reproduce is refused before any hook
or file exists.
"""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from connito.experts import ExpertAddressError, ExpertMask, ExpertView
from connito.routing import RouterObserver
from connito.routing.opt_out import (
    PROVENANCE_FILE,
    OptOut,
    OptOutError,
    in_every_layer,
    remove_experts,
    save_without_experts,
)
from tests.experts.conftest import build_tiny

# family, config overrides, experts opted out in every MoE layer (tiny models: 8 experts, top-2)
CASES = {
    "qwen3_moe": ("qwen3_moe", {"norm_topk_prob": False}, (3,)),
    "qwen3_moe-renorm": ("qwen3_moe", {"norm_topk_prob": True}, (3,)),
    "mixtral": ("mixtral", {}, (5,)),  # always renormalises
    "olmoe": ("olmoe", {}, (0,)),
    "flex_olmo": ("flex_olmo", {"norm_topk_prob": True}, (7,)),
    "qwen2_moe": ("qwen2_moe", {}, (2,)),  # gated shared expert beside the routed ones
    "deepseek_v2": ("deepseek_v2", {}, (1,)),  # greedy, scaled, dense layer 0
    "deepseek_v2-groups": (  # group-limited: one expert from each of the 2 groups of 4
        "deepseek_v2",
        {"topk_method": "group_limited_greedy", "n_group": 2, "topk_group": 1},
        (1, 6),
    ),
    "deepseek_v3": ("deepseek_v3", {}, (1, 6)),  # sigmoid + choice bias, 2 groups of 4, best 1 choosable
}
EXPERT_COUNT_KEY = {
    "mixtral": "num_local_experts",
    "deepseek_v2": "n_routed_experts",
    "deepseek_v3": "n_routed_experts",
}
"""The config field holding the expert count, written from the transformers configs (not from the code under test)."""
INPUT_IDS = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(7))


def tiny(model_type: str, **overrides):
    model = build_tiny(model_type, **overrides)
    view = ExpertView(model)
    generator = torch.Generator().manual_seed(3)
    for layer in view.moe_layers:  # DeepSeek-V3's choice bias is zeros at init: make ignoring it show
        bias = view.choice_bias(layer)
        if bias is not None:
            view.write_choice_bias(layer, 0.2 * torch.randn(bias.shape, generator=generator))
    return model


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUT_IDS).logits


def chosen_experts(model) -> dict[int, torch.Tensor]:
    """The expert ids each MoE layer's routing used in one forward, as a router observer sees them."""
    chosen = {}
    observer = RouterObserver(model)
    observer.subscribe(lambda record: chosen.__setitem__(record.layer, record.topk_ids_TK.detach().clone()))
    logits(model)
    observer.close()
    return chosen


def router_hooks(model) -> int:
    view = ExpertView(model)
    return sum(len(view.block(layer).router_module._forward_hooks) for layer in view.moe_layers)


@pytest.mark.parametrize("case", sorted(CASES))
def test_opt_out_equals_the_model_built_without_the_experts(case):
    model_type, overrides, experts = CASES[case]
    model = tiny(model_type, **overrides)
    view = ExpertView(model)
    before = logits(model)
    used = chosen_experts(model)
    assert all(bool(torch.isin(used[layer], torch.tensor(experts)).any()) for layer in view.moe_layers), (
        "the opted-out experts must be used by the full model, or the test proves nothing"
    )

    with OptOut(model, in_every_layer(*experts)):
        opted_out = logits(model)
        used_under_opt_out = chosen_experts(model)
    smaller = remove_experts(model, in_every_layer(*experts))

    assert torch.equal(opted_out, logits(smaller))  # bit for bit, not within a tolerance
    assert not torch.equal(opted_out, before)
    assert torch.equal(logits(model), before) and router_hooks(model) == 0  # the edit came off; model untouched
    for layer in view.moe_layers:
        assert not bool(torch.isin(used_under_opt_out[layer], torch.tensor(experts)).any())

    # the smaller model: same class, the expert count the family's config names, top-k kept, rows gone in order
    kept = [e for e in range(8) if e not in experts]
    assert type(smaller) is type(model)
    assert getattr(smaller.config, EXPERT_COUNT_KEY.get(model_type, "num_experts")) == len(kept)
    assert (
        smaller.config.num_experts_per_tok == 2
        and getattr(model.config, EXPERT_COUNT_KEY.get(model_type, "num_experts")) == 8
    )
    small_view = ExpertView(smaller)
    assert small_view.moe_layers == view.moe_layers and small_view.num_experts == len(kept)
    for layer in view.moe_layers:
        assert torch.equal(small_view.read_router(layer), view.read_router(layer)[kept])
        for new, old in enumerate(kept):
            new_tensors, old_tensors = small_view.read_expert((layer, new)), view.read_expert((layer, old))
            assert all(torch.equal(new_tensors[k], old_tensors[k]) for k in old_tensors)
        if view.choice_bias(layer) is not None:
            assert torch.equal(small_view.choice_bias(layer), view.choice_bias(layer)[kept])
        if view.shared_experts(layer) is not None:
            shared_old, shared_new = (
                view.shared_experts(layer).state_dict(),
                small_view.shared_experts(layer).state_dict(),
            )
            assert all(torch.equal(shared_new[k], shared_old[k]) for k in shared_old)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v3"])
def test_opt_out_equals_removal_in_bfloat16(model_type):
    """bf16 routers (DeepSeek's computes its logits in fp32, Qwen's in bf16) stay bit-exact too."""
    model = tiny(model_type).to(torch.bfloat16)
    experts = CASES[model_type][2]
    with OptOut(model, in_every_layer(*experts)):
        opted_out = logits(model)
    smaller = remove_experts(model, in_every_layer(*experts))
    assert smaller.dtype == torch.bfloat16 and opted_out.dtype == torch.bfloat16
    assert torch.equal(opted_out, logits(smaller))


def test_gradients_under_opt_out_equal_the_smaller_models():
    """Opt-out is an inference feature, but nothing in it cuts the graph: every gradient equals the smaller
    model's bit for bit (the opted-out expert's router row and weights get exactly zero)."""
    model = tiny("mixtral")
    smaller = remove_experts(model, in_every_layer(5))
    with OptOut(model, in_every_layer(5)):
        model(INPUT_IDS).logits.square().mean().backward()
    smaller(INPUT_IDS).logits.square().mean().backward()
    small_grads = {name: p.grad for name, p in smaller.named_parameters()}
    kept = [e for e in range(8) if e != 5]
    for name, param in model.named_parameters():
        if param.shape[:1] == (8,):  # router rows and stacked experts
            assert bool((param.grad[5] == 0).all()) and torch.equal(param.grad[kept], small_grads[name]), name
        else:
            assert torch.equal(param.grad, small_grads[name]), name


def test_opt_out_per_layer_never_chooses_the_experts_and_matches_routing_without_them():
    """Different experts per layer (no smaller model exists for that): never chosen, and the weights of the others
    are the family's renormalised softmax over the kept experts only."""
    model = tiny("qwen3_moe", norm_topk_prob=True)
    removed = {0: [1], 1: [2, 5], 2: []}
    records = {}
    with OptOut(model, [(layer, e) for layer, es in removed.items() for e in es]):
        observer = RouterObserver(model)
        observer.subscribe(lambda record: records.__setitem__(record.layer, record))
        logits(model)
        observer.close()
    for layer, experts in removed.items():
        record = records[layer]
        assert not bool(torch.isin(record.topk_ids_TK, torch.tensor(experts, dtype=torch.long)).any())
        if not experts:
            continue
        assert bool(torch.isinf(record.logits_TE[:, experts]).all())
        probs_TE = torch.softmax(record.logits_TE.float(), dim=-1)  # -inf: probability exactly 0
        assert bool((probs_TE[:, experts] == 0).all())
        top_TK = probs_TE.topk(2, dim=-1)
        torch.testing.assert_close(record.topk_ids_TK, top_TK.indices, rtol=0, atol=0)
        expected_TK = top_TK.values / top_TK.values.sum(dim=-1, keepdim=True)
        torch.testing.assert_close(record.topk_weights_TK, expected_TK, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3"])
def test_opting_nothing_out_is_the_identity(model_type):
    model = tiny(model_type)
    before = logits(model)
    view = ExpertView(model)
    for nothing in ([], in_every_layer(), view.empty_mask()):
        with OptOut(model, nothing) as edit:
            assert router_hooks(model) == 0 and len(edit.opted_out) == 0
            assert torch.equal(logits(model), before)
    assert torch.equal(logits(remove_experts(model, [])), before)  # the rebuilt model is the same model


@pytest.mark.parametrize("model_type", ["qwen2_moe", "mixtral", "deepseek_v3"])
def test_the_saved_smaller_checkpoint_loads_in_plain_transformers_with_the_same_logits(model_type, tmp_path):
    source = tmp_path / "source"
    tiny(model_type).save_pretrained(source)
    (source / "tokenizer_config.json").write_text('{"model_max_length": 64}\n')  # stands for the tokenizer files
    experts = CASES[model_type][2]
    out = save_without_experts(source, in_every_layer(*experts), tmp_path / "smaller")

    original = AutoModelForCausalLM.from_pretrained(source).eval()
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with OptOut(original, in_every_layer(*experts)):
        expected = logits(original)
    assert torch.equal(logits(reloaded), expected)
    assert reloaded.config.to_dict()[EXPERT_COUNT_KEY.get(model_type, "num_experts")] == 8 - len(experts)
    assert (out / "tokenizer_config.json").read_text() == '{"model_max_length": 64}\n'
    provenance = json.loads((out / PROVENANCE_FILE).read_text())
    kept = [e for e in range(8) if e not in experts]
    assert provenance["kept"] == {str(layer): kept for layer in ExpertView(original).moe_layers}
    assert ExpertMask.from_dict(provenance["removed"]).ids() == [
        (layer, e) for layer in ExpertView(original).moe_layers for e in experts
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smaller", "source"]  # no staging leftovers


def refusals(model_type: str):
    """(experts, error type, message fragment, refused by OptOut too) per refusal."""
    # one expert more in layer 2 than elsewhere (DeepSeek-V3: one per group of 4 more, so the groups stay equal)
    uneven = (
        [(1, 1), (1, 5), (2, 1), (2, 5), (2, 2), (2, 6)]
        if model_type == "deepseek_v3"
        else [(0, 1), (1, 1), (2, 1), (2, 4)]
    )
    return [
        (in_every_layer(*range(7)), OptOutError, "fewer than top-k 2", True),
        (uneven, OptOutError, "lose different numbers of experts", False),
        ([(3, 0)], ExpertAddressError, "layer 3 is out of range", True),
        ([(1, 8)], ExpertAddressError, "expert 8 is out of range", True),
        (in_every_layer(9), ExpertAddressError, "expert 9 is out of range", True),
        (ExpertMask.empty(3, 4, [0, 1, 2]), ExpertAddressError, "the expert mask is [3 layers, 4 experts]", True),
    ]


@pytest.mark.parametrize("model_type", ["qwen3_moe", "deepseek_v3"])
def test_refusals_name_the_reason_and_leave_the_model_unhooked(model_type):
    model = tiny(model_type)
    before = logits(model)
    for experts, error, message, opt_out_refuses in refusals(model_type):
        with pytest.raises(error, match=message.replace("[", r"\[")):
            remove_experts(model, experts)
        if opt_out_refuses:
            with pytest.raises(error, match=message.replace("[", r"\[")):
                OptOut(model, experts)
        else:
            OptOut(model, experts).remove()  # per-layer counts are fine at inference
        assert router_hooks(model) == 0
    assert torch.equal(logits(model), before)


def test_dense_layers_have_no_experts_to_opt_out():
    model = tiny("deepseek_v3")
    for call in (OptOut, remove_experts):
        with pytest.raises(ExpertAddressError, match=r"layer 0 is a dense layer \(no MoE block\)"):
            call(model, [(0, 1)])


@pytest.mark.parametrize(
    "experts, message",
    [
        (in_every_layer(3), r"takes \[1, 0\] experts from the groups.*as many experts from each group"),
        (in_every_layer(1, 2, 3, 5, 6, 7), r"each group would keep 1 experts, its group score needs 2"),
        (in_every_layer(1, 2, 5, 6), None),  # 2 left per group: the 1 choosable group holds exactly top-k
    ],
)
def test_group_limited_routing_is_refused_where_no_model_without_the_experts_exists(experts, message):
    model = tiny("deepseek_v3")  # 2 groups of 4, topk_group 1, top-2, group score: sum of the top 2
    if message is None:
        with OptOut(model, experts):
            opted_out = logits(model)
        assert torch.equal(opted_out, logits(remove_experts(model, experts)))
        return
    for call in (OptOut, remove_experts):
        with pytest.raises(OptOutError, match=message):
            call(model, experts)


def test_a_router_whose_logits_are_not_hidden_times_weight_is_refused():
    model = tiny("qwen3_moe")
    router = model.model.layers[1].mlp.gate
    forward = router.forward
    router.forward = lambda hidden: (lambda out: (2 * out[0], out[1], out[2]))(forward(hidden))
    with OptOut(model, in_every_layer(3)), pytest.raises(OptOutError, match="computes its logits otherwise"):
        logits(model)


def test_a_refused_save_writes_nothing(tmp_path):
    source = tmp_path / "source"
    tiny("mixtral").save_pretrained(source)
    for experts in ([(0, 1)], in_every_layer(*range(7)), [(5, 0)]):
        with pytest.raises((OptOutError, ExpertAddressError)):
            save_without_experts(source, experts, tmp_path / "out")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["source"]
    with pytest.raises(Exception, match="Connito never writes into its inputs"):
        save_without_experts(source, in_every_layer(1), source / "inside")
    assert not (source / "inside").exists()
