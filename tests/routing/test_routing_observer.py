"""Router observation: what a subscriber sees is what each MoE block did, in both layouts.

For every family, on a tiny transformers model (single process, the eager and the default experts implementation)
and after DeepSpeed AutoEP swapped the blocks (ep 2 on 2 gloo ranks, each rank its own tokens; the view worker's
runs, ``tests/experts/view_worker.py``): the captured ids and weights recombined with the experts the view reads
reproduce every MoE block's output, the captured logits are ``hidden @ router_weight.T``, the ids and weights follow
the family's routing rule (DeepSeek-V3: chosen by sigmoid + choice bias, group-limited, weighted without the bias),
observing changes no logit, and removing a subscription or closing the observer leaves nothing behind.
Also: :class:`LoadBalancingLoss` equals transformers' own loss on OLMoE.
"""

import pytest
import torch
from transformers.models.olmoe.modeling_olmoe import load_balancing_loss_func

from connito.experts import ExpertView
from connito.routing import LoadBalancingLoss, RouterObserver
from tests.experts.conftest import TINY, build_tiny
from tests.experts.view_worker import view_run
from tests.routing.observe_worker import read_all_experts, routing_report

FAMILIES = sorted(TINY)
AUTOEP_DEFAULT_RUN = {"qwen3_moe", "deepseek_v3"}
RTOL = ATOL = 1e-5
CHOICE_BIAS_SCALE = 0.1


def sources():
    """(layout, family): ``eager`` / ``default``: a transformers model with that experts implementation (the
    default is grouped_mm); ``ep2``: AutoEP layers on 2 ranks."""
    for family in FAMILIES:
        for layout in ("eager", "default"):
            yield pytest.param(layout, family, id=f"{family}-hf-{layout}")
        marks = [pytest.mark.distributed] + ([] if family in AUTOEP_DEFAULT_RUN else [pytest.mark.slow])
        yield pytest.param("ep2", family, id=f"{family}-autoep-ep2", marks=marks)


def give_choice_bias(model) -> None:
    """DeepSeek-V3's choice bias is zeros at init: give it distinct random values per layer (through the router
    modules) so that routing without it, or with the wrong layer's, shows."""
    for index, layer in enumerate(model.model.layers):
        bias = getattr(getattr(layer.mlp, "gate", None), "e_score_correction_bias", None)
        if isinstance(bias, torch.Tensor):
            generator = torch.Generator().manual_seed(100 + index)
            with torch.no_grad():
                bias.copy_(CHOICE_BIAS_SCALE * torch.randn(bias.shape, generator=generator))


def hf_report(family: str, implementation: str) -> dict:
    model = build_tiny(family)
    if implementation == "eager":
        model.set_experts_implementation("eager")
    assert model.config._experts_implementation == ("eager" if implementation == "eager" else "grouped_mm")
    give_choice_bias(model)
    view = ExpertView(model)
    input_ids = torch.randint(3, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(7))
    return {"moe_layers": view.moe_layers, "routing": routing_report(model, view, read_all_experts(view), input_ids)}


@pytest.fixture(scope="session")
def reports(tmp_path_factory, data_cache):
    """``get(layout, family)``: one report per rank, each made once per session."""
    root, done = tmp_path_factory.mktemp("routing-runs"), {}

    def get(layout: str, family: str) -> list[dict]:
        if (layout, family) not in done:
            if layout == "ep2":
                run_dir = view_run(family, "ep2", root, data_cache)
                done[layout, family] = [torch.load(run_dir / f"rank{r}.pt") for r in range(2)]
            else:
                done[layout, family] = [hf_report(family, layout)]
        return done[layout, family]

    return get


@pytest.mark.parametrize(("layout", "family"), sources())
def test_captured_routing_recombined_reproduces_every_moe_block_output(reports, layout, family):
    """sum_k w_k * SwiGLU_{id_k}(x) (+ the shared expert path) == the block's output, per token, every MoE layer,
    fp32; the logits are ``hidden @ router_weight.T``. At ep 2 each rank checks its own tokens."""
    for report in reports(layout, family):
        routing = report["routing"]
        assert [layer["layer"] for layer in routing["layers"]] == report["moe_layers"]  # one record per layer, in order
        for layer in routing["layers"]:
            torch.testing.assert_close(layer["logits_TE"], layer["expected_logits_TE"], rtol=RTOL, atol=ATOL)
            torch.testing.assert_close(layer["recombined_TH"], layer["output_TH"], rtol=RTOL, atol=ATOL)
            assert layer["output_TH"].abs().max() > 100 * ATOL
            assert layer["ids_TK"].unique().numel() > 2  # tokens spread over experts
    if layout == "ep2":
        first, second = (report["routing"]["layers"][0]["logits_TE"] for report in reports(layout, family))
        assert not torch.equal(first, second)  # the two ranks routed different tokens


@pytest.mark.parametrize(("layout", "family"), sources())
def test_captured_ids_and_weights_follow_the_family_routing_rule(reports, layout, family):
    """Ids: the top-k of the scores (softmax; DeepSeek-V3: sigmoid + choice bias, group-limited with n_group=2,
    topk_group=1). Weights: the scores of the chosen ids without the bias, renormalised when the family does,
    times DeepSeek's routed_scaling_factor."""
    for report in reports(layout, family):
        for layer in report["routing"]["layers"]:
            assert torch.equal(layer["ids_TK"], layer["expected_ids_TK"]), f"layer {layer['layer']}"
            torch.testing.assert_close(layer["weights_TK"], layer["expected_weights_TK"], rtol=RTOL, atol=1e-6)
            if family != "deepseek_v3":
                assert layer["choice_bias_E"] is None
                continue
            bias = layer["choice_bias_E"]
            generator = torch.Generator().manual_seed(100 + layer["layer"])
            assert torch.equal(bias, CHOICE_BIAS_SCALE * torch.randn(bias.shape, generator=generator))
            # The bias and the group limit both decide: without them other experts would have been chosen.
            scores = layer["logits_TE"].sigmoid()
            assert not torch.equal(layer["ids_TK"], layer["unbiased_ids_TK"])
            ungrouped = (scores + bias).topk(layer["ids_TK"].shape[1], dim=-1).indices.sort(dim=-1).values
            assert not torch.equal(layer["ids_TK"], ungrouped)


@pytest.mark.parametrize(("layout", "family"), sources())
def test_observing_changes_no_logit(reports, layout, family):
    for report in reports(layout, family):
        routing = report["routing"]
        assert torch.equal(routing["logits_plain"], routing["logits_observed"])


@pytest.mark.parametrize(("layout", "family"), sources())
def test_removed_subscription_gets_nothing_and_close_takes_every_hook_off(reports, layout, family):
    """Two subscribers; after one's ``remove()`` it gets nothing while the other still gets every MoE layer; after
    ``observer.close()`` the routers hold exactly the hooks they had before the observer (none on transformers'
    routers; AutoEP's presets keep a router-logit recorder of their own)."""
    for report in reports(layout, family):
        routing = report["routing"]
        assert routing["records_after_remove"] == 0
        assert routing["kept_after_remove"] == len(report["moe_layers"])
        assert routing["kept_after_close"] == 0
        baseline, before, after = routing["hooks_baseline"], routing["hooks_before_close"], routing["hooks_after_close"]
        assert after == baseline
        assert all(len(b) == len(a) + 1 for b, a in zip(before, baseline))  # one observer hook each
        if layout != "ep2":
            assert after == [[] for _ in baseline]


def test_load_balancing_loss_equals_transformers_on_olmoe():
    """The observed loss equals transformers' ``load_balancing_loss_func`` on the router logits transformers itself
    returns for the same input (with the consumer removed: its pre-hook turns output_router_logits off)."""
    model = build_tiny("olmoe")
    view = ExpertView(model)
    input_ids = torch.randint(3, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    observer = RouterObserver(model, view)
    loss_term = LoadBalancingLoss(model, observer)

    outputs = model(input_ids=input_ids, output_router_logits=True)
    assert outputs.router_logits is None and outputs.aux_loss is None  # the pre-hook turned recording off
    observed = loss_term.compute()
    assert loss_term.compute() is None  # the captures are consumed
    loss_term.remove()
    model(input_ids=input_ids)
    assert loss_term.compute() is None  # removed: it records nothing more

    reference_outputs = model(input_ids=input_ids, output_router_logits=True)
    assert len(reference_outputs.router_logits) == len(view.moe_layers) == 3
    reference = load_balancing_loss_func(reference_outputs.router_logits, view.num_experts, view.top_k)
    assert observed.requires_grad
    assert torch.equal(observed, reference)
    assert torch.equal(reference, reference_outputs.aux_loss)
    observer.close()
