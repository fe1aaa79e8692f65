"""Streaming routing statistics and what they imply.

Hand-made routing records against counts done by hand (plain Python loops over tokens); a real forward of tiny
models through a :class:`RouterObserver` against the per-layer identities the counts must satisfy and brute-force
concentration; a planted domain expert; too few tokens; merge / checkpoint round trips; bad input. Distributed:
two gloo ranks (data parallel, and AutoEP expert parallel) stream their own validation rows of a model trained one
step, all-reduce, and must equal the single-process statistics of all rows computed here from the run's HF export.
"""

import logging
import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from connito.analysis.statistics import COUNTS, RoutingStatistics, router_scores
from connito.analysis.summaries import (
    coactivation_conditional,
    domain_specialisation,
    esft_gate_scores,
    esft_selection_ratios,
    experts_to_reach,
    summarise,
    topn_overlap,
)
from connito.experts import ExpertAddressError, ExpertMask, ExpertView
from connito.routing import RouterObserver, RoutingRecord
from tests.analysis.stats_worker import MICRO_BATCH, NUM_ROWS
from tests.experts.conftest import build_tiny
from tests.helpers import REPO, small_overrides, torchrun

E, K = 8, 2  # the tiny models' experts and top-k
INTEGER_COUNTS = ("tokens_D", "selected_DLE", "top1_DLE", "coactivation_LEE")
FLOAT_SUMS = ("gate_sum_DLE", "weight_sum_DLE")


@pytest.fixture(scope="module")
def qwen_view():
    return ExpertView(build_tiny("qwen3_moe"))  # MoE layers 0, 1, 2; 8 experts; top-2


def record(layer, ids, weights, logits=None):
    ids_TK = torch.tensor(ids, dtype=torch.int64)
    logits_TE = torch.zeros(ids_TK.shape[0], E) if logits is None else torch.tensor(logits, dtype=torch.float32)
    return RoutingRecord(layer, logits_TE, ids_TK, torch.tensor(weights, dtype=torch.float32))


def detached(rec: RoutingRecord) -> RoutingRecord:
    return RoutingRecord(rec.layer, rec.logits_TE.detach(), rec.topk_ids_TK.detach(), rec.topk_weights_TK.detach())


def stream(stats, forwards):
    """``forwards``: [(domains, [record per MoE layer])]; what the observer does during each forward."""
    for domains, records in forwards:
        stats.set_domains(torch.tensor(domains))
        for rec in records:
            stats.consume(rec)


def hand_counts(forwards, num_domains, moe_layers, family="qwen3_moe"):
    """The counts with Python loops over tokens, one token and one (i, j) pair at a time."""
    D, L = num_domains, len(moe_layers)
    out = {name: torch.zeros(shape, dtype=torch.float64) for name, shape in [
        ("tokens_D", (D,)), ("gate_sum_DLE", (D, L, E)), ("selected_DLE", (D, L, E)),
        ("weight_sum_DLE", (D, L, E)), ("top1_DLE", (D, L, E)), ("coactivation_LEE", (L, E, E)),
    ]}  # fmt: skip
    for domains, records in forwards:
        for rec in records:
            li = moe_layers.index(rec.layer)
            for t, d in enumerate(domains):
                if d < 0:
                    continue
                if li == 0:
                    out["tokens_D"][d] += 1
                logits = rec.logits_TE[t].double().tolist()
                if family == "deepseek_v3":
                    raw = [1 / (1 + math.exp(-x)) for x in logits]
                else:
                    raw = [math.exp(x) for x in logits]
                for e in range(E):
                    out["gate_sum_DLE"][d, li, e] += raw[e] / sum(raw)
                ids, weights = rec.topk_ids_TK[t].tolist(), rec.topk_weights_TK[t].double().tolist()
                for e, w in zip(ids, weights):
                    out["selected_DLE"][d, li, e] += 1
                    out["weight_sum_DLE"][d, li, e] += w
                    for j in ids:
                        out["coactivation_LEE"][li, e, j] += 1
                out["top1_DLE"][d, li, ids[weights.index(max(weights))]] += 1
    return out


HAND_FORWARDS = [
    (
        [0, 1, -1, 0],
        [
            record(
                0,
                [[0, 3], [3, 5], [1, 2], [3, 0]],
                [[0.6, 0.4], [0.3, 0.7], [0.5, 0.5], [0.5, 0.5]],
                logits=[
                    [2.0, 0, 0, 1.0, 0, 0, 0, 0],
                    [0, 0, 0, 3.0, 0, 1.0, 0, 0],
                    [0, 9.0, 9.0, 0, 0, 0, 0, 0],
                    [-1.0, 0, 0, 0.5, 0, 0, 0, 0],
                ],
            ),
            record(1, [[7, 6], [7, 6], [7, 6], [1, 2]], [[0.9, 0.1], [0.9, 0.1], [0.9, 0.1], [0.2, 0.8]]),
            record(2, [[4, 5], [4, 5], [4, 5], [4, 5]], [[0.5, 0.5]] * 4),
        ],
    ),
    (
        [1, 1],
        [
            record(0, [[3, 5], [2, 3]], [[0.6, 0.4], [0.1, 0.9]]),
            record(1, [[6, 7], [6, 7]], [[0.5, 0.5], [0.5, 0.5]]),
            record(2, [[0, 1], [1, 0]], [[0.5, 0.5], [0.5, 0.5]]),
        ],
    ),
]


def test_hand_records_accumulate_exactly_the_hand_counts(qwen_view):
    stats = RoutingStatistics(qwen_view, 2, ("a", "b"))
    stream(stats, HAND_FORWARDS)
    expected = hand_counts(HAND_FORWARDS, 2, [0, 1, 2])
    for name in INTEGER_COUNTS:
        assert torch.equal(getattr(stats, name), expected[name]), name
    for name in FLOAT_SUMS:
        torch.testing.assert_close(getattr(stats, name), expected[name], rtol=1e-14, atol=1e-15)
    # A few of the numbers written out: token 2 (domain -1) counts nowhere.
    assert stats.tokens_D.tolist() == [2, 3]
    assert stats.selected_DLE[:, 0, 3].tolist() == [2, 3]  # expert 3, layer 0: tokens 0, 3 (a); 1, 4, 5 (b)
    assert stats.selected_DLE[:, 0, 1].tolist() == [0, 0]  # only the ignored token picked expert 1 at layer 0
    assert stats.top1_DLE[:, 0, 3].tolist() == [1, 2]  # token 3's tie (0.5, 0.5) goes to its first id, 3
    assert stats.top1_DLE[:, 0, 0].tolist() == [1, 0]
    assert stats.weight_sum_DLE[1, 0, 3].item() == pytest.approx(0.3 + 0.6 + 0.9)
    assert stats.coactivation_LEE[0, 0, 3] == stats.coactivation_LEE[0, 3, 0] == 2  # tokens 0 and 3
    assert stats.coactivation_LEE[0, 3, 3] == 5 and stats.coactivation_LEE[1, 6, 7] == 4
    assert stats.gate_sum_DLE[0, 0].sum().item() == pytest.approx(2.0)  # softmax rows sum to 1 per token
    assert stats.gate_sum_DLE[0, 0, 0].item() == pytest.approx(
        math.exp(2) / (math.exp(2) + math.exp(1) + 6) + math.exp(-1) / (math.exp(-1) + math.exp(0.5) + 6)
    )


def test_sigmoid_scores_are_normalised_per_token():
    logits_TE = torch.tensor([[0.0, 1.0, -2.0, 3.0], [5.0, 5.0, 5.0, 5.0]])
    sigmoid_TE = logits_TE.double().sigmoid()
    scores_TE = router_scores("deepseek_v3", logits_TE)
    torch.testing.assert_close(scores_TE, sigmoid_TE / sigmoid_TE.sum(-1, keepdim=True), rtol=0, atol=1e-15)
    assert scores_TE[1].tolist() == [0.25] * 4 and scores_TE.dtype == torch.float64
    torch.testing.assert_close(router_scores("mixtral", logits_TE), logits_TE.double().softmax(-1))
    assert not torch.allclose(router_scores("qwen3_moe", logits_TE), scores_TE)


def brute_force_experts_needed(score_E, threshold):
    values = sorted(score_E.tolist(), reverse=True)
    total = sum(values)
    if total == 0:
        return 0
    for n in range(1, len(values) + 1):
        if sum(values[:n]) / total >= threshold - 1e-9:
            return n
    return len(values)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_real_forward_counts_add_up_per_layer_and_concentration_is_brute_force(family):
    """One forward of a tiny model with a real observer: the counts equal the hand counts of the records a second
    subscriber captured; ESFT gate scores and selection ratios sum to 1 per (domain, layer)."""
    model = build_tiny(family)
    view = ExpertView(model)
    observer = RouterObserver(model, view)
    stats = RoutingStatistics(view, 3)
    stats.attach(observer)
    captured = []
    observer.subscribe(lambda rec: captured.append(detached(rec)))
    generator = torch.Generator().manual_seed(5)
    input_ids_BS = torch.randint(3, model.config.vocab_size, (4, 16), generator=generator)
    domain_ids_BS = torch.randint(-1, 3, (4, 16), generator=generator)
    stats.set_domains(domain_ids_BS.reshape(-1))
    with torch.no_grad():
        model(input_ids=input_ids_BS)
    observer.close()

    assert [rec.layer for rec in captured] == view.moe_layers == ([1, 2] if family == "deepseek_v3" else [0, 1, 2])
    expected = hand_counts([(domain_ids_BS.reshape(-1).tolist(), captured)], 3, view.moe_layers, family)
    for name in INTEGER_COUNTS:
        assert torch.equal(getattr(stats, name), expected[name]), name
    for name in FLOAT_SUMS:
        torch.testing.assert_close(getattr(stats, name), expected[name], rtol=1e-12, atol=1e-12)
    tokens_D = stats.tokens_D
    assert tokens_D.tolist() == [float((domain_ids_BS == d).sum()) for d in range(3)]
    assert (tokens_D > 10).all()

    gate_DLE = esft_gate_scores(stats.weight_sum_DLE, tokens_D, min_tokens=1)
    ratio_DLE = esft_selection_ratios(stats.selected_DLE, tokens_D, K, min_tokens=1)
    torch.testing.assert_close(gate_DLE.sum(-1), torch.ones(3, len(view.moe_layers), dtype=torch.float64))
    torch.testing.assert_close(ratio_DLE.sum(-1), torch.ones(3, len(view.moe_layers), dtype=torch.float64))
    assert torch.equal(stats.top1_DLE.sum(-1), tokens_D[:, None].expand(3, len(view.moe_layers)))
    assert torch.equal(stats.coactivation_LEE.diagonal(dim1=1, dim2=2), stats.selected_DLE.sum(0))

    needed_DLP = experts_to_reach(gate_DLE, (0.5, 0.8, 0.9))
    assert (needed_DLP[..., 0] <= needed_DLP[..., 1]).all() and (needed_DLP[..., 1] <= needed_DLP[..., 2]).all()
    assert (needed_DLP >= 1).all() and (needed_DLP <= E).all()
    for d in range(3):
        for li in range(len(view.moe_layers)):
            for p, threshold in enumerate((0.5, 0.8, 0.9)):
                assert needed_DLP[d, li, p] == brute_force_experts_needed(gate_DLE[d, li], threshold)


def test_concentration_on_known_shares():
    score_DLE = torch.tensor([[[0.5, 0.3, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25], [0.0, 0.0, 0.0, 0.0]]])
    assert experts_to_reach(score_DLE, (0.5, 0.8, 0.9)).tolist() == [[[1, 2, 3], [2, 4, 4], [0, 0, 0]]]
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        experts_to_reach(score_DLE, (0.5, 1.5))


def test_observing_with_statistics_attached_leaves_logits_bit_identical():
    model = build_tiny("qwen3_moe")
    input_ids_BS = torch.randint(3, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = model(input_ids=input_ids_BS).logits
        observer = RouterObserver(model)
        stats = RoutingStatistics(observer.view, 1)
        stats.attach(observer)
        stats.set_domains(torch.zeros(32, dtype=torch.int64))
        observed = model(input_ids=input_ids_BS).logits
    assert stats.tokens_D.tolist() == [32.0]
    assert torch.equal(plain, observed)
    observer.close()


def planted_forward():
    """3 domains x 200 tokens. Layer 1: every token picks expert 0; domain 1 pairs it with expert 3, domains 0 and
    2 alternate experts 6 and 7, and one token of domain 2 picks expert 4 instead. Layers 0 and 2: experts 0, 1."""
    domains = [d for d in range(3) for _ in range(200)]
    second = [3 if d == 1 else 6 + t % 2 for t, d in enumerate(domains)]
    second[-1] = 4
    layer1 = record(1, [[0, s] for s in second], [[0.5, 0.5]] * 600)
    plain = [[0, 1]] * 600
    return [(domains, [record(0, plain, [[0.6, 0.4]] * 600), layer1, record(2, plain, [[0.6, 0.4]] * 600)])]


def test_planted_domain_expert_is_found_for_its_domain_only(qwen_view):
    stats = RoutingStatistics(qwen_view, 3, ("x", "y", "z"))
    stream(stats, planted_forward())
    summary = summarise(stats)
    spec_LE = summary.specialisation.specialisation_LE
    assert spec_LE[1, 3].item() == pytest.approx(1.0, abs=1e-12)  # only domain y picks expert 3
    assert spec_LE[1, 0].item() == pytest.approx(0.0, abs=1e-12)  # every token of every domain picks expert 0
    assert spec_LE[0, 1].item() == pytest.approx(0.0, abs=1e-12)
    assert spec_LE[1, 6].item() == pytest.approx(1 - math.log(2) / math.log(3))  # x and z alike: below 0.5
    assert spec_LE[1, 4].item() == pytest.approx(1.0)  # one token of z only: specialised but rare
    assert spec_LE[1, 5].item() == 0.0  # never picked
    assert summary.specialisation.domain_share_DLE[:, 1, 3].tolist() == [0.0, 1.0, 0.0]

    masks = summary.domain_experts
    assert all(isinstance(m, ExpertMask) and m.shape == (3, E) for m in masks.values())
    assert masks["y"].ids() == [(1, 3)]
    assert masks["x"].ids() == [] and masks["z"].ids() == []  # z's expert 4 has rate 1/200 < K / (2E)
    permissive = summarise(stats, min_rate=0.0).domain_experts
    assert permissive["z"].ids() == [(1, 4)] and permissive["y"].ids() == [(1, 3)]

    # gate mass = top-k weights: at layer 1 domain y puts half on expert 0 and half on expert 3 (its router's zero
    # logits, a uniform full distribution, do not count: ceil(8 p) experts, [4, 7, 8], by the old definition)
    assert summary.experts_needed_DLP[1, 1].tolist() == [1, 2, 2]
    assert summary.router_score_DLE[1, 1].tolist() == [1 / 8] * 8
    # Top-2 sets at layer 1: x {0, 6}, y {0, 3}, z {0, 6} (6 and 7 tie at 100 each for x; z: 6 100, 7 99).
    assert summary.topn_sets_DLE[:, 1].nonzero().tolist() == [[0, 0], [0, 6], [1, 0], [1, 3], [2, 0], [2, 6]]
    assert summary.overlap_LDD[1].tolist() == [[1.0, 1 / 3, 1.0], [1 / 3, 1.0, 1 / 3], [1.0, 1 / 3, 1.0]]


def test_coactivation_conditional_by_hand():
    co_LEE = torch.tensor([[[4.0, 1.0, 3.0], [1.0, 2.0, 1.0], [3.0, 1.0, 4.0]], [[0.0, 0, 0], [0, 5, 5], [0, 5, 5]]])
    cond_LEE = coactivation_conditional(co_LEE)
    assert cond_LEE[0].tolist() == [[1.0, 0.25, 0.75], [0.5, 1.0, 0.5], [0.75, 0.25, 1.0]]
    assert cond_LEE[1].tolist() == [[0.0, 0.0, 0.0], [0.0, 1.0, 1.0], [0.0, 1.0, 1.0]]


def test_topn_overlap_by_hand():
    ratio_DLE = torch.tensor([[[0.5, 0.3, 0.2, 0.0]], [[0.1, 0.2, 0.3, 0.4]], [[0.0, 0.0, 0.0, 0.0]]])
    sets_DLE, overlap_LDD = topn_overlap(ratio_DLE, 2)
    assert sets_DLE[:, 0].tolist() == [[True, True, False, False], [False, False, True, True], [False] * 4]
    assert overlap_LDD[0].tolist() == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
    _, overlap3_LDD = topn_overlap(ratio_DLE, 3)
    assert overlap3_LDD[0, 0, 1].item() == pytest.approx(2 / 4)  # {0, 1, 2} vs {1, 2, 3}


def test_too_few_tokens_warn_and_give_finite_zeros(qwen_view, caplog):
    stats = RoutingStatistics(qwen_view, 3, ("big", "small", "empty"))
    domains = [0] * 150 + [1] * 7
    ids = [[t % E, (t + 1) % E] for t in range(157)]
    stream(stats, [(domains, [record(layer, ids, [[0.7, 0.3]] * 157) for layer in (0, 1, 2)])])
    with caplog.at_level(logging.WARNING, logger="connito.analysis"):
        summary = summarise(stats)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "'small' has 7 routed tokens, fewer than min_tokens=100" in warnings[0]
    assert "'empty' has 0 routed tokens" in warnings[1]
    assert summary.usable_D.tolist() == [True, False, False]
    for tensor in (summary.gate_score_DLE, summary.selection_ratio_DLE, summary.overlap_LDD,
                   summary.specialisation.specialisation_LE, summary.specialisation.domain_share_DLE):  # fmt: skip
        assert torch.isfinite(tensor).all()
    for tensor in (summary.gate_score_DLE, summary.selection_ratio_DLE, summary.experts_needed_DLP):
        assert not tensor[1:].any() and tensor[0].any()
    assert not summary.specialisation.specialisation_LE.any()  # one usable domain: nothing to contrast
    assert len(summary.domain_experts["small"]) == len(summary.domain_experts["big"]) == 0
    assert summary.overlap_LDD[:, 0, 0].tolist() == [1.0] * 3 and not summary.overlap_LDD[:, 1:].any()
    spec = domain_specialisation(torch.zeros(2, 3, E), torch.zeros(2), min_tokens=0)
    assert torch.isfinite(spec.specialisation_LE).all() and not spec.specialisation_LE.any()


def test_merge_and_state_dict_round_trip(qwen_view):
    whole, first, second = (RoutingStatistics(qwen_view, 2) for _ in range(3))
    stream(whole, HAND_FORWARDS)
    stream(first, HAND_FORWARDS[:1])
    stream(second, HAND_FORWARDS[1:])
    first.merge_(second)
    for name in COUNTS:
        torch.testing.assert_close(getattr(first, name), getattr(whole, name), rtol=1e-15, atol=0)
    restored = RoutingStatistics(qwen_view, 2)
    state = whole.state_dict()
    assert all(type(t) is torch.Tensor for t in state.values())
    restored.load_state_dict(state)
    assert all(torch.equal(getattr(restored, name), getattr(whole, name)) for name in COUNTS)
    state["gate_sum_DLE"] += 1  # a copy, not the live counts
    assert not torch.equal(restored.gate_sum_DLE, state["gate_sum_DLE"])
    with pytest.raises(ValueError, match=r"'tokens_D' has shape \(2,\), expected \(3,\) \(3 domains"):
        RoutingStatistics(qwen_view, 3).load_state_dict(whole.state_dict())
    with pytest.raises(ValueError, match="do not add"):
        whole.merge_(RoutingStatistics(qwen_view, 3))


def test_bad_input_is_refused_with_the_fix(qwen_view):
    with pytest.raises(ValueError, match="num_domains=0: routing statistics need at least one domain"):
        RoutingStatistics(qwen_view, 0)
    with pytest.raises(ValueError, match="2 domain names"):
        RoutingStatistics(qwen_view, 3, ("a", "b"))
    stats = RoutingStatistics(qwen_view, 2)
    with pytest.raises(RuntimeError, match="call stats.set_domains"):
        stats.consume(HAND_FORWARDS[1][1][0])
    stats.set_domains(torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match=r"layer 0 routed 2 tokens but set_domains gave 3 domain ids.*reshape\(-1\)"):
        stats.consume(HAND_FORWARDS[1][1][0])
    with pytest.raises(ValueError, match=r"domain ids \[2, 5\] are out of range: there are 2 domains"):
        stats.set_domains(torch.tensor([0, 2, 5, -1]))
    with pytest.raises(TypeError, match="integer tensor"):
        stats.set_domains(torch.tensor([0.0, 1.0]))
    stream(stats, HAND_FORWARDS[1:])  # a full forward uses the domains up
    with pytest.raises(RuntimeError, match="no domains were set"):
        stats.consume(HAND_FORWARDS[1][1][0])
    deepseek = ExpertView(build_tiny("deepseek_v3"))
    with pytest.raises(ValueError, match=r"MoE layers \[1, 2\] with 8 experts"):
        stats.attach(RouterObserver(deepseek.model, deepseek))
    config = AutoConfig.for_model("llama", vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    with pytest.raises(ExpertAddressError, match="dense model"):
        ExpertView(AutoModelForCausalLM.from_config(config))


# -- distributed ---------------------------------------------------------------------------------------------------
LAYOUTS = {"dp2": 1, "ep2": 2}
"""Layout -> parallel.ep_size, on 2 ranks."""
FLOAT_RTOL = {"dp2": 1e-12, "ep2": 1e-6}
"""dp2: every rank's forward is bit-identical to the export's, only the order of summing forwards differs. ep2:
AutoEP's expert kernels round differently from transformers', so hidden states (and the router logits of every
layer after the first) differ at ~1e-7; measured relative error of the sums 2.3e-8."""


def reference(model, view, domains, batches) -> RoutingStatistics:
    stats = RoutingStatistics(view, len(domains), domains)
    observer = RouterObserver(model, view)
    stats.attach(observer)
    with torch.no_grad():
        for input_ids_BS, domain_ids_BS in batches:
            stats.set_domains(domain_ids_BS.reshape(-1))
            model(input_ids=input_ids_BS)
    observer.close()
    return stats


def assert_counts(got: dict, expected: RoutingStatistics, rtol: float) -> None:
    for name in INTEGER_COUNTS:
        assert torch.equal(got[name], getattr(expected, name)), name
    for name in FLOAT_SUMS:
        torch.testing.assert_close(got[name], getattr(expected, name), rtol=rtol, atol=0)


@pytest.mark.distributed
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_statistics_all_reduced_over_two_ranks_equal_the_single_process_statistics(layout, tmp_path, data_cache):
    run_dir = tmp_path / layout
    args = small_overrides(data_cache) + [
        "model=qwen3_moe_tiny", "train.steps=1", "train.eval_every=0", "train.eval_batches=1",
        "train.checkpoint_every=0", "train.micro_batch_size=2", "train.export=true",
        f"parallel.ep_size={LAYOUTS[layout]}",
    ]  # fmt: skip
    proc = torchrun(2, REPO / "tests" / "analysis" / "stats_worker.py", [str(run_dir), *args], timeout=600)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-8000:])
    reports = [torch.load(run_dir / f"stats{r}.pt") for r in range(2)]
    assert [r["ep_size"] for r in reports] == [LAYOUTS[layout]] * 2
    domains = reports[0]["domains"]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks ran: the same matmul blocking, the same rounding
    try:
        export = AutoModelForCausalLM.from_pretrained(run_dir / "hf", dtype="auto").eval()
        view = ExpertView(export)
        per_rank = [reference(export, view, domains, r["batches"]) for r in reports]
        single = reference(export, view, domains, [b for r in reports for b in r["batches"]])
    finally:
        torch.set_num_threads(threads)

    rtol = FLOAT_RTOL[layout]
    assert sorted(reports[0]["rows"] + reports[1]["rows"]) == sorted(set(reports[0]["rows"] + reports[1]["rows"]))
    assert single.tokens_D.sum() == NUM_ROWS * (64 - 1)  # every token but the first of each row (domain -1)
    assert len(reports[0]["batches"]) == NUM_ROWS // (2 * MICRO_BATCH)
    for report, expected in zip(reports, per_rank):  # each rank counted its own tokens ...
        assert_counts(report["local"], expected, rtol)
        assert_counts(report["global"], single, rtol)  # ... and after the all-reduce holds everyone's
    assert not torch.equal(reports[0]["local"]["selected_DLE"], reports[1]["local"]["selected_DLE"])
    if layout == "dp2":  # bit-identical forwards: the local counts equal the reference exactly
        assert all(torch.equal(reports[0]["local"][n], getattr(per_rank[0], n)) for n in COUNTS)


def test_esft_gate_score_is_the_mean_top_k_gate_value_normalised_per_layer():
    """ESFT-Gate (Wang et al. 2024): the gate value of an expert for a token is its weight when the token chose it and
    0 otherwise; the score is its mean over the domain's tokens, a share of the layer's gate mass. Hand-computed on a
    routing where the router's full distribution ranks expert 3 second although no token ever chooses it."""
    from connito.analysis.expert_scores import pick_per_layer

    view = ExpertView(build_tiny("qwen3_moe"))  # 8 experts, top-2, MoE layers 0-2
    stats = RoutingStatistics(view, 1, ("code",))
    probs_TE = torch.tensor(
        [
            [0.30, 0.25, 0.02, 0.20, 0.08, 0.05, 0.05, 0.05],  # token A chooses experts 0, 1
            [0.28, 0.02, 0.26, 0.22, 0.07, 0.05, 0.05, 0.05],  # token B chooses experts 0, 2
        ],
        dtype=torch.float64,
    )
    ids_TK = torch.tensor([[0, 1], [0, 2]])
    weights_TK = probs_TE.gather(1, ids_TK) / probs_TE.gather(1, ids_TK).sum(1, keepdim=True)  # norm_topk_prob
    stats.set_domains(torch.zeros(2, dtype=torch.int64))
    for layer in view.moe_layers:
        stats.consume(RoutingRecord(layer, probs_TE.log().float(), ids_TK, weights_TK.float()))
    summary = summarise(stats, min_tokens=1)

    a0, a1 = 0.30 / 0.55, 0.25 / 0.55  # token A's weights
    b0, b2 = 0.28 / 0.54, 0.26 / 0.54  # token B's
    expected_E = torch.tensor([(a0 + b0) / 2, a1 / 2, b2 / 2, 0, 0, 0, 0, 0], dtype=torch.float64)
    for i in range(len(view.moe_layers)):
        torch.testing.assert_close(summary.gate_score_DLE[0, i], expected_E, rtol=1e-6, atol=1e-7)
        # the full router distribution's mean, kept as router_score: expert 3 gets 0.21 of it
        torch.testing.assert_close(summary.router_score_DLE[0, i], probs_TE.mean(0), rtol=1e-6, atol=1e-7)
    # ESFT's rule at top_p 0.6: expert 0 (0.532), then expert 2 (0.241); the full-distribution mean would add
    # expert 3, which processes no token of the domain
    assert pick_per_layer(summary.gate_score_DLE[0], 0.6)[0].nonzero().flatten().tolist() == [0, 2]
    assert pick_per_layer(summary.router_score_DLE[0], 0.6)[0].nonzero().flatten().tolist() == [0, 2, 3]
