"""The expert-domain map's arithmetic on hand-set counts: top-k counting per domain, frequencies, the phi threshold
against each domain's maximum, the exponential moving average (0.9 new, 0.1 old), domains without tokens, the state
round trip, and the phase plan's boundaries and trainable sets."""

import pytest
import torch

from connito.adaptation.des_moe.config import DesMoeConfig
from connito.adaptation.des_moe.domain_map import ExpertDomainMap, serving_experts
from connito.adaptation.des_moe.phases import BACKBONE_PARTS, PhasePlan, backbone_names, backbone_parts, trainable_set
from connito.adaptation.des_moe.router import AdaptiveRouters
from connito.experts import ExpertView
from connito.training.callbacks import CallbackError
from tests.experts.conftest import build_tiny


def test_counting_adds_each_tokens_top_k_to_its_domains_row():
    dmap = ExpertDomainMap(num_domains=2, moe_layers=[1, 2], num_experts=4, phi=0.6, ema_new=0.9)
    domains = torch.tensor([0, 0, 1, -1])
    dmap.count(1, domains, torch.tensor([[0, 1], [0, 2], [3, 2], [0, 1]]))
    dmap.count(2, domains, torch.tensor([[1, 2], [1, 3], [1, 0], [2, 3]]))
    assert int(dmap.counts_DLE.sum()) == 0  # this rank's counts join the window at the next sync
    dmap.sync()
    assert dmap.tokens_D.tolist() == [2, 1]  # the -1 token counts nowhere; tokens counted once per forward
    assert dmap.counts_DLE[0].tolist() == [[2, 1, 1, 0], [0, 2, 1, 1]]
    assert dmap.counts_DLE[1].tolist() == [[0, 0, 1, 1], [1, 1, 0, 0]]
    assert dmap.serves_DLE is None and dmap.experts_LE([0, 1]) is None  # no map before the first refresh
    with pytest.raises(ValueError, match="routed 3 tokens but the micro-batch has 4 domain ids"):
        dmap.count(1, domains, torch.zeros(3, 2, dtype=torch.long))


def test_phi_keeps_experts_at_least_phi_of_the_domains_maximum_and_never_an_unpicked_one():
    freq_DLE = torch.tensor([[[0.5, 0.3, 0.29, 0.0]], [[0.0] * 4], [[0.2, 0.2, 0.1, 0.12]]], dtype=torch.float64)
    serves = serving_experts(freq_DLE, 0.6)
    assert serves[0, 0].tolist() == [True, True, False, False]  # 0.3 >= 0.6 * 0.5, 0.29 is not
    assert serves[1, 0].tolist() == [False] * 4  # a domain never seen has no experts
    assert serves[2, 0].tolist() == [True, True, False, True]  # ties at the maximum; 0.12 = 0.6 * 0.2
    assert serving_experts(torch.tensor([[[6 / 7, 10 / 7, 5.9 / 7]]], dtype=torch.float64), 0.6).tolist() == [
        [[True, True, False]]
    ]  # exactly phi of the maximum serves, whatever the rounding of the quotients


def test_refresh_blends_window_frequencies_with_an_ema_of_0_9_new_and_0_1_old():
    dmap = ExpertDomainMap(num_domains=3, moe_layers=[0], num_experts=4, phi=0.6, ema_new=0.9)
    # window 1 (hand-set counts): domain 0 saw 10 tokens, domain 1 saw 20, domain 2 none
    dmap.counts_DLE[0, 0] = torch.tensor([10, 6, 4, 0])
    dmap.counts_DLE[1, 0] = torch.tensor([2, 20, 4, 14])
    dmap.tokens_D[:] = torch.tensor([10, 20, 0])
    serves = dmap.refresh()
    torch.testing.assert_close(dmap.freq_DLE[0, 0], torch.tensor([1.0, 0.6, 0.4, 0.0], dtype=torch.float64))
    torch.testing.assert_close(dmap.freq_DLE[1, 0], torch.tensor([0.1, 1.0, 0.2, 0.7], dtype=torch.float64))
    assert serves[0, 0].tolist() == [True, True, False, False]
    assert serves[1, 0].tolist() == [False, True, False, True]
    assert serves[2, 0].tolist() == [False] * 4 and dmap.estimated_D.tolist() == [True, True, False]
    assert int(dmap.counts_DLE.sum()) == 0 and int(dmap.tokens_D.sum()) == 0  # a new window starts
    # window 2: domain 0 changes its mind, domain 1 has no tokens (keeps its estimate), domain 2 appears
    dmap.counts_DLE[0, 0] = torch.tensor([0, 5, 5, 5])
    dmap.counts_DLE[2, 0] = torch.tensor([1, 0, 0, 3])
    dmap.tokens_D[:] = torch.tensor([5, 0, 4])
    serves = dmap.refresh()
    expected0 = 0.9 * torch.tensor([0.0, 1.0, 1.0, 1.0]) + 0.1 * torch.tensor([1.0, 0.6, 0.4, 0.0])
    torch.testing.assert_close(dmap.freq_DLE[0, 0], expected0.double())  # [0.1, 0.96, 0.94, 0.9]
    torch.testing.assert_close(dmap.freq_DLE[1, 0], torch.tensor([0.1, 1.0, 0.2, 0.7], dtype=torch.float64))
    torch.testing.assert_close(dmap.freq_DLE[2, 0], torch.tensor([0.25, 0.0, 0.0, 0.75], dtype=torch.float64))
    assert serves[0, 0].tolist() == [False, True, True, True]
    assert serves[2, 0].tolist() == [False, False, False, True]  # 0.25 < 0.6 * 0.75: its first window as it is
    assert dmap.experts_LE([0, 2]).tolist() == [[False, True, True, True]]
    assert dmap.experts_LE([1]).tolist() == [[False, True, False, True]]
    assert dmap.refreshes == 2


def test_map_state_round_trips_and_refuses_another_shape():
    dmap = ExpertDomainMap(2, [1], 4, 0.6, 0.9)
    dmap.count(1, torch.tensor([0, 1]), torch.tensor([[0, 1], [2, 3]]))
    dmap.refresh()
    dmap.count(1, torch.tensor([1, 1]), torch.tensor([[0, 1], [0, 3]]))
    dmap.sync()
    other = ExpertDomainMap(2, [1], 4, 0.6, 0.9)
    other.load_state_dict(dmap.state_dict())
    assert torch.equal(other.counts_DLE, dmap.counts_DLE) and torch.equal(other.serves_DLE, dmap.serves_DLE)
    assert torch.equal(other.freq_DLE, dmap.freq_DLE) and other.refreshes == 1
    with pytest.raises(ValueError, match=r"map state of shape \(2, 1, 4\), this run needs \(3, 1, 4\)"):
        ExpertDomainMap(3, [1], 4, 0.6, 0.9).load_state_dict(dmap.state_dict())


def test_phase_plan_boundaries_and_sets():
    plan = PhasePlan.from_fractions([0.2, 0.7], [["router", "backbone"], ["router", "experts"], ["experts"]], 10)
    assert plan.starts == (2, 7)
    assert [plan.phase_at(s) for s in range(10)] == [0, 0, 1, 1, 1, 1, 1, 2, 2, 2]
    assert plan.union() == {"router", "backbone", "experts"}
    model = build_tiny("qwen2_moe")
    AdaptiveRouters(model, seed=0)
    view = ExpertView(model)
    names = backbone_names(model, view)
    assert "model.layers.0.mlp.shared_expert.gate_proj.weight" in names  # shared experts are backbone
    assert "model.embed_tokens.weight" in names and "model.norm.weight" in names
    assert not any(".mlp.gate." in n or ".mlp.experts." in n for n in names)
    backbone = backbone_parts(model, view)
    experts_LE = torch.zeros(len(view.moe_layers), 8, dtype=torch.bool)
    experts_LE[1, 3] = True
    phase1 = trainable_set(plan.parts[0], view, experts_LE, backbone)
    assert phase1.routers and set(phase1.modules) == set(names) and len(phase1.experts) == 0
    phase2 = trainable_set(plan.parts[1], view, experts_LE, backbone)
    assert phase2.routers and phase2.modules == () and phase2.experts.ids() == [(1, 3)]
    phase3 = trainable_set(plan.parts[2], view, None, backbone)  # before any map: every routed expert
    assert not phase3.routers and len(phase3.experts) == 3 * 8


def test_backbone_parts_partition_the_backbone_by_what_each_parameter_is():
    model = build_tiny("qwen2_moe")
    AdaptiveRouters(model, seed=0)
    view = ExpertView(model)
    parts = backbone_parts(model, view)
    assert tuple(parts) == BACKBONE_PARTS
    flat = [name for names in parts.values() for name in names]
    assert sorted(flat) == sorted(backbone_names(model, view)) and len(flat) == len(set(flat))  # a partition
    # classified by hand from the module tree of Qwen2-MoE
    for name in flat:
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            expected = "embeddings"
        elif ".self_attn." in name:
            expected = "attention"
        elif name.endswith(("input_layernorm.weight", "post_attention_layernorm.weight", "model.norm.weight")):
            expected = "norms"
        else:
            assert ".mlp.shared_expert" in name or (".mlp." in name and ".experts." not in name), name
            expected = "mlp"
        assert name in parts[expected], f"{name} should be in {expected}"
    assert parts["attention"] and parts["norms"] and parts["mlp"] and parts["embeddings"]
    only = trainable_set(frozenset({"router", "attention", "norms"}), view, None, parts)
    assert set(only.modules) == set(parts["attention"]) | set(parts["norms"]) and only.routers
    assert not only.experts.ids()


def test_config_refuses_bad_options_with_the_fix():
    with pytest.raises(CallbackError, match=r"phase_parts has 2 phases but phase_ends=\[0.2, 0.7\] makes 3"):
        DesMoeConfig(phase_parts=[["router"], ["experts"]])
    with pytest.raises(CallbackError, match=r"every phase names at least one of .* \(unknown: \['expert'\]\)"):
        DesMoeConfig(phase_parts=[["router"], ["expert"], ["experts"]])
    with pytest.raises(CallbackError, match=r"phase_ends=\[0.7, 0.2\] must be increasing fractions"):
        DesMoeConfig(phase_ends=[0.7, 0.2])
    with pytest.raises(CallbackError, match=r"phi=0 must be in \(0, 1\]"):
        DesMoeConfig(phi=0)
    config = DesMoeConfig(phase_ends=[0.5], phase_parts=["router", ["experts", "backbone"]])
    assert config.phase_parts == [["router"], ["experts", "backbone"]]
    config = DesMoeConfig(phase_parts=[["router", "attention", "norms"], ["router", "experts"], ["experts"]])
    assert config.phase_parts[0] == ["router", "attention", "norms"]


def test_the_map_is_locked_when_the_last_phase_starts():
    """DES-MoE (Li et al. 2025) fixes the expert-domain map in phase III: refreshed at the end of the warm-up, every
    T steps in phase II, once more when phase III starts, never after (unless lock_map_in_last_phase=false).
    Connito's steps: refresh_due(s) is asked after s optimizer steps; phase III starts at step 70 of 100 here."""
    from types import SimpleNamespace

    from connito.adaptation.des_moe.callback import DesMoe
    from connito.adaptation.des_moe.config import DesMoeConfig
    from connito.adaptation.des_moe.phases import PhasePlan

    def refreshes(steps: int, warmup: int, lock: bool, every: int = 10) -> list[int]:
        config = DesMoeConfig(refresh_every=every, lock_map_in_last_phase=lock)
        plan = PhasePlan.from_fractions([0.2, 0.7], [["router"], ["experts"], ["experts"]], steps)  # III from 70
        callback = SimpleNamespace(config=config, warmup_steps=warmup, plan=plan)
        return [s for s in range(1, steps + 1) if DesMoe.refresh_due(callback, s)]

    assert refreshes(100, 20, lock=True) == [20, 30, 40, 50, 60, 70]
    assert refreshes(100, 20, lock=False) == [20, 30, 40, 50, 60, 70, 80, 90, 100]
    assert refreshes(100, 75, lock=True) == [75]  # a warm-up ending inside phase III: its first map, then locked
    assert refreshes(100, 20, lock=True, every=0) == [20]  # refresh_every=0: the warm-up map stays
