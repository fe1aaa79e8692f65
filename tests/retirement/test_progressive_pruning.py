"""Task-specific progressive pruning (``callbacks.progressive_prune``): the additive mask, the schedule, the callback
end to end through ``connito train``, and its resume.

The mask is *additive*: dead experts get ``+(-inf)`` on their router logits and survivors ``+0``, so survivors keep
their logits bit for bit, their order, and their rank above every dead expert. A *multiplicative* mask
(``logits * m``, MC-SMoE's reproduction) does not: ``m = 0`` lifts a dead expert's logit to 0, above every negative
surviving logit, and ``m = -inf`` flips a negative dead logit to ``+inf`` (chosen first).
:func:`test_multiplicative_masking_is_not_order_safe` shows both on concrete logits, so the property tested for the
additive mask is not vacuous.
"""

import json
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from connito.experts import ExpertView
from connito.retirement.progressive import JSON_FILE, PRUNED_DIR, ProgressivePrune, write_pruned
from connito.retirement.progressive_mask import AdditiveExpertMask, MaskError, additive_mask, masked_route
from connito.retirement.progressive_schedule import PruneSchedule, normalised_usage, plan_drops, schedule_cap
from connito.routing import RouterObserver
from connito.routing.edits import RoutingRule, routing_rule
from connito.training.callbacks import CallbackError
from tests.experts.conftest import build_tiny
from tests.helpers import REPO, clean_env, small_overrides

INPUT_IDS = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(7))


# -- (1) the additive mask never reorders the survivors --------------------------------------------------------------


def test_additive_masking_keeps_the_order_of_surviving_logits():
    generator = torch.Generator().manual_seed(0)
    for trial in range(300):
        num_experts = int(torch.randint(2, 17, (1,), generator=generator))
        scale = float(torch.rand(1, generator=generator)) * 20
        logits_TE = (torch.randn(32, num_experts, generator=generator) - 0.5) * scale  # mostly negative too
        if trial % 3 == 0:
            logits_TE = -logits_TE.abs()  # every logit negative: where a multiplicative mask goes wrong
        dead_E = torch.rand(num_experts, generator=generator) < 0.5
        dead_E[int(torch.randint(num_experts, (1,), generator=generator))] = False  # at least one survivor
        alive = (~dead_E).nonzero().flatten()
        masked_TE = logits_TE + additive_mask(dead_E, logits_TE)

        assert torch.equal(masked_TE[:, alive], logits_TE[:, alive])  # survivors bit for bit
        assert torch.isneginf(masked_TE[:, dead_E]).all()
        # the order of the survivors is theirs, and they rank above every dead expert
        order_T = masked_TE.argsort(dim=-1, descending=True, stable=True)[:, : len(alive)]
        expected_T = alive[logits_TE[:, alive].argsort(dim=-1, descending=True, stable=True)]
        assert torch.equal(order_T, expected_T)

        # routing: survivors only (weight > 0), softmax over the survivors; surplus top-k picks weigh exactly 0
        top_k = int(torch.randint(1, num_experts + 1, (1,), generator=generator))
        for renormalize in (False, True):
            rule = RoutingRule("softmax", top_k, renormalize)
            _, weights_TK, ids_TK = masked_route(rule, logits_TE, dead_E)
            live_TK = ~dead_E[ids_TK]
            assert (weights_TK[~live_TK] == 0).all()
            assert (live_TK.sum(dim=-1) == min(top_k, len(alive))).all()
            survivors_TA = torch.softmax(logits_TE[:, alive], dim=-1)
            expected_TK = survivors_TA.topk(min(top_k, len(alive)), dim=-1).values
            if renormalize:
                expected_TK = expected_TK / expected_TK.sum(dim=-1, keepdim=True)
            got_TK = (
                weights_TK.masked_fill(~live_TK, -1).sort(dim=-1, descending=True).values[:, : expected_TK.shape[1]]
            )
            torch.testing.assert_close(got_TK, expected_TK)


def test_multiplicative_masking_is_not_order_safe():
    logits_E = torch.tensor([-1.0, -3.0, -2.0, 0.5])
    dead_E = torch.tensor([False, True, False, True])  # survivors 0 and 2: best is 0 (-1.0)
    keep_E = (~dead_E).float()
    by_zero = logits_E * keep_E  # dead -> 0: both dead experts now outrank survivor 0
    assert by_zero.argmax() in (1, 3) and by_zero[1] > by_zero[0]
    by_neg_inf = logits_E * torch.where(dead_E, float("-inf"), 1.0)  # dead expert 1: -3 * -inf = +inf
    assert by_neg_inf[1] == float("inf") and by_neg_inf.argmax() == 1
    additive = logits_E + additive_mask(dead_E, logits_E)
    assert additive.argmax() == 0 and additive.topk(2).indices.tolist() == [0, 2]


def test_a_choice_bias_cannot_pick_a_dead_expert():
    logits_TE = torch.zeros(4, 4)
    bias_E = torch.tensor([0.0, 0.0, 5.0, 5.0])  # the dead experts have the best choice bias
    rule = RoutingRule("sigmoid", 2, True, 1.0, (1, 1), "top2_sum", bias_E, sorted_topk=False)
    dead_E = torch.tensor([False, False, True, True])
    _, weights_TK, ids_TK = masked_route(rule, logits_TE, dead_E)
    assert sorted(ids_TK[0].tolist()) == [0, 1] and torch.allclose(weights_TK, torch.full((4, 2), 0.5))


# family, overrides (tiny models: 8 experts, top-2)
FAMILIES = {
    "qwen3_moe": ("qwen3_moe", {"norm_topk_prob": False}),
    "qwen3_moe-renorm": ("qwen3_moe", {"norm_topk_prob": True}),
    "mixtral": ("mixtral", {}),
    "olmoe": ("olmoe", {}),
    "qwen2_moe": ("qwen2_moe", {}),
    "deepseek_v2": ("deepseek_v2", {}),
    "deepseek_v3-one-group": ("deepseek_v3", {"n_group": 1, "topk_group": 1}),
}


def tiny(model_type: str, **overrides):
    model = build_tiny(model_type, **overrides)
    view = ExpertView(model)
    generator = torch.Generator().manual_seed(3)
    for layer in view.moe_layers:  # DeepSeek-V3's choice bias is zeros at init: make it matter
        bias = view.choice_bias(layer)
        if bias is not None:
            with torch.no_grad():
                bias.copy_(torch.randn(bias.shape, generator=generator) * 0.05)
    return model


@pytest.mark.parametrize("case", sorted(FAMILIES))
@pytest.mark.parametrize("survivors", [1, 3])
def test_masked_model_equals_the_pruned_checkpoint(case, survivors, tmp_path):
    """Every layer keeps ``survivors`` experts (1: fewer than top-k 2, the surgery lowers top-k)."""
    model_type, overrides = FAMILIES[case]
    if model_type == "deepseek_v3" and survivors < 2:
        pytest.skip("DeepSeek-V3's top-2 group score needs two experts per group")
    model = tiny(model_type, **overrides)
    view = ExpertView(model)
    generator = torch.Generator().manual_seed(11)
    kept = {layer: sorted(torch.randperm(8, generator=generator)[:survivors].tolist()) for layer in view.moe_layers}
    dead_ME = torch.ones(len(view.moe_layers), 8, dtype=torch.bool)
    for m, layer in enumerate(view.moe_layers):
        dead_ME[m, kept[layer]] = False
    with torch.no_grad():
        plain = model(INPUT_IDS).logits
        mask = AdditiveExpertMask(model)
        assert torch.equal(model(INPUT_IDS).logits, plain)  # nothing dead: the identity
        mask.set_dead(dead_ME)
        chosen = []
        observer = RouterObserver(model)
        observer.subscribe(lambda r: chosen.append((r.layer, r.topk_ids_TK[r.topk_weights_TK > 0])))
        masked = model(INPUT_IDS).logits
        observer.close()
        mask.remove()
    for layer, ids in chosen:  # the observer sees the edited routing: only survivors carry weight
        assert set(ids.unique().tolist()) <= set(kept[layer])

    model.save_pretrained(tmp_path / "full")
    done = write_pruned(tmp_path / "full", kept, tmp_path / "pruned")
    assert done["top_k"] == {"before": 2, "after": min(2, survivors)}
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", dtype=torch.float32).eval()
    pruned_view = ExpertView(pruned)
    assert pruned_view.num_experts == survivors and pruned_view.top_k == min(2, survivors)
    with torch.no_grad():
        torch.testing.assert_close(pruned(INPUT_IDS).logits, masked, atol=1e-5, rtol=1e-5)
    provenance = json.loads((tmp_path / "pruned" / "connito_opt_out.json").read_text())
    assert provenance["kept"] == {str(layer): experts for layer, experts in kept.items()}


def test_gradients_through_the_mask_are_finite_and_zero_for_dead_rows():
    model = tiny("qwen3_moe", norm_topk_prob=True)
    view = ExpertView(model)
    mask = AdditiveExpertMask(model)
    dead_ME = torch.zeros(len(view.moe_layers), 8, dtype=torch.bool)
    dead_ME[:, 1:] = True  # one survivor, top-2
    mask.set_dead(dead_ME)
    model.train()
    model(INPUT_IDS, labels=INPUT_IDS).loss.backward()
    for layer in view.moe_layers:
        grad = view.router_weight(layer).grad
        assert grad is not None and torch.isfinite(grad).all()
        assert (grad[1:] == 0).all()  # no gradient reaches a dead router row through the routing


def test_group_limited_routing_is_refused():
    with pytest.raises(MaskError, match="group-limited"):
        AdditiveExpertMask(tiny("deepseek_v3"))  # 2 groups of 4


def test_masked_route_equals_the_rule_when_nothing_is_dead():
    model = tiny("deepseek_v3", n_group=1, topk_group=1)
    view = ExpertView(model)
    rule = routing_rule(view, view.moe_layers[0])
    logits_TE = torch.randn(16, 8, generator=torch.Generator().manual_seed(2))
    weights_TK, ids_TK = rule.route(logits_TE)
    _, got_weights_TK, got_ids_TK = masked_route(rule, logits_TE, torch.zeros(8, dtype=torch.bool))
    assert torch.equal(got_ids_TK, ids_TK) and torch.equal(got_weights_TK, weights_TK)


# -- (2) the schedule ------------------------------------------------------------------------------------------------


def test_schedule_cap_is_linear_from_all_experts_to_the_target():
    assert [schedule_cap(w, 7, 8, 1) for w in range(1, 8)] == [7, 6, 5, 4, 3, 2, 1]
    assert [schedule_cap(w, 3, 8, 1) for w in range(1, 5)] == [6, 4, 1, 1]
    assert [schedule_cap(w, 4, 8, 2) for w in range(1, 5)] == [7, 5, 4, 2]
    assert schedule_cap(1, 1, 8, 3) == 3


def test_plan_drops_threshold_then_schedule_then_target():
    alive = torch.ones(3, 8, dtype=torch.bool)
    usage = torch.tensor(
        [
            [0.30, 0.30, 0.20, 0.10, 0.05, 0.04, 0.009, 0.001],  # 2 under 0.1/8 = 0.0125: experts 6, 7
            [0.125] * 8,  # flat: none under the threshold, ties drop the higher index first
            [0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5],  # 6 under the threshold
        ],
        dtype=torch.float64,
    )
    # cap 7 (schedule drops 1): layer 0 drops its 2 under the threshold; layer 1 its highest index (ties);
    # layer 2 its 6 unused experts, but target 3 stops it at 5 (the highest indices among the ties go first)
    dropped = plan_drops(usage, alive, beta=0.1, cap=7, target=3)
    assert [row.nonzero().flatten().tolist() for row in dropped] == [[6, 7], [7], [2, 3, 4, 5, 6]]
    # a larger schedule step wins over the threshold: cap 4 drops the 4 least used
    dropped = plan_drops(usage, alive, beta=0.1, cap=4, target=1)
    assert [row.nonzero().flatten().tolist() for row in dropped] == [[4, 5, 6, 7], [4, 5, 6, 7], [1, 2, 3, 4, 5, 6]]
    # dead experts never drop again and never count
    alive[0, 7] = False
    dropped = plan_drops(usage, alive, beta=0.1, cap=8, target=1)
    assert dropped[0].nonzero().flatten().tolist() == [6]  # threshold is now 0.1/7 and 7 is dead


def test_normalised_usage_is_over_survivors():
    ema = torch.tensor([[0.4, 0.4, 0.2, 0.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    alive = torch.tensor([[True, False, True, True], [True, True, False, False]])
    usage = normalised_usage(ema, alive)
    torch.testing.assert_close(usage[0], torch.tensor([2 / 3, 0.0, 1 / 3, 0.0], dtype=torch.float64))
    torch.testing.assert_close(usage[1], torch.tensor([0.5, 0.5, 0.0, 0.0], dtype=torch.float64))  # no usage: uniform


def test_schedule_drops_exactly_the_expected_experts_per_window():
    """Synthetic counts, EMA 0 (usage = the last step's share): 2 layers of 6 experts, target 1, 3 windows."""
    schedule = PruneSchedule([1, 3], 6, target=1, num_windows=3, beta=0.1, ema=0.0)
    counts = torch.tensor(
        [
            [50.0, 30.0, 15.0, 4.0, 1.0, 0.0],  # shares .5 .3 .15 .04 .01 0; threshold 0.1/6 = .0167: 4, 5
            [10.0, 10.0, 20.0, 20.0, 20.0, 20.0],  # flat-ish: none under the threshold
        ]
    )
    schedule.observe(counts)
    expected = [
        # window 1: cap 6 - floor(5/3) = 5. Layer 1: threshold drops 4, 5; layer 3: the schedule drops the
        # least used, ties broken by the higher index (expert 1)
        {"1": [4, 5], "3": [1]},
        # window 2: cap 6 - floor(10/3) = 3. Layer 1 (4 alive, shares .5 .3 .15 .04, threshold .025): schedule
        # drops 1 -> expert 3; layer 3 (5 alive): drops 2 -> expert 0, then expert 5 (ties .222: higher index)
        {"1": [3], "3": [0, 5]},
        # window 3: cap 1 (the target): layer 1 keeps expert 0, layer 3 keeps expert 2 (ties: lower index kept)
        {"1": [1, 2], "3": [3, 4]},
    ]
    for window, want in enumerate(expected, start=1):
        if window > 1:
            schedule.observe(counts)
        dropped = schedule.end_window(step=10 * window)
        assert {str(layer): dropped[m].nonzero().flatten().tolist() for m, layer in enumerate([1, 3])} == want
    assert schedule.kept() == {1: [0], 3: [2]} and schedule.finished
    assert [entry["step"] for entry in schedule.history] == [10, 20, 30]
    assert schedule.history[-1]["alive_mask"] == [[1, 0, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0]]
    with pytest.raises(ValueError, match="windows"):
        schedule.end_window(step=40)


def test_schedule_ema_and_state_round_trip():
    schedule = PruneSchedule([0], 4, target=1, num_windows=2, ema=0.5)
    schedule.observe(torch.tensor([[4.0, 4.0, 0.0, 0.0]]))  # first step: the share itself
    schedule.observe(torch.tensor([[0.0, 8.0, 0.0, 0.0]]))
    torch.testing.assert_close(schedule.ema_ME, torch.tensor([[0.25, 0.75, 0.0, 0.0]], dtype=torch.float64))
    schedule.observe(torch.zeros(1, 4))  # no token: the EMA stays
    torch.testing.assert_close(schedule.ema_ME, torch.tensor([[0.25, 0.75, 0.0, 0.0]], dtype=torch.float64))
    schedule.end_window(step=5)
    state = schedule.state_dict()
    copy = PruneSchedule([0], 4, target=1, num_windows=2, ema=0.5)
    copy.load_state_dict(state)
    assert torch.equal(copy.alive_ME, schedule.alive_ME) and torch.equal(copy.ema_ME, schedule.ema_ME)
    assert copy.history == schedule.history and copy.windows_done == 1 and copy.steps_observed == 3
    with pytest.raises(CallbackError, match="resume the run with the model"):
        PruneSchedule([0, 1], 4, target=1, num_windows=2).load_state_dict(state)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"target": 0, "window": 5}, "target >= 1"),
        ({"target": 1, "window": 0}, "positive whole number"),
        ({"target": 1, "window": 5, "beta": 1.0}, r"beta in \(0, 1\)"),
        ({"target": 1, "window": 5, "beta": 0.0}, r"beta in \(0, 1\)"),
        ({"target": 1, "window": 5, "ema": 1.0}, r"\[0, 1\)"),
        ({"target": 1, "window": 5, "schedule_end": 0.0}, r"\(0, 1\]"),
    ],
)
def test_bad_options_are_refused_with_the_fix(options, match):
    with pytest.raises(CallbackError, match=match):
        ProgressivePrune(**options)


# -- (3) end to end through `connito train` (slow: ~1 min) -------------------------------------------------------------

STEPS, WINDOW = 12, 3  # schedule_end 0.75: 3 windows, at steps 3, 6, 9; caps 6, 4, 1 (8 experts, target 1)


def train_args(data_cache, name: str, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "connito", "train", f"run.name={name}", f"train.steps={STEPS}", "train.eval_every=0",
        "train.checkpoint_every=0", "+callbacks.progressive_prune.target=1",
        f"+callbacks.progressive_prune.window={WINDOW}", *small_overrides(data_cache), *extra,
    ]  # fmt: skip


def run_train(args: list[str], cwd):
    import subprocess

    proc = subprocess.run(args, cwd=cwd, env=clean_env(PYTHONPATH=str(REPO)), capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def straight_run(data_cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("progressive")
    proc = run_train(train_args(data_cache, "straight"), root)
    return root / "runs" / "straight", proc


@pytest.mark.slow
def test_train_prunes_to_one_expert_per_layer(straight_run):
    run_dir, proc = straight_run
    record = json.loads((run_dir / JSON_FILE).read_text())
    assert record["num_windows"] == 3 and [w["step"] for w in record["windows"]] == [3, 6, 9]
    assert [w["cap"] for w in record["windows"]] == [6, 4, 1]
    layers = record["moe_layers"]
    # the schedule replays: each window's drops are plan_drops of its usage on the alive mask before it
    alive = torch.ones(len(layers), record["num_experts"], dtype=torch.bool)
    for entry in record["windows"]:
        usage = torch.tensor([entry["usage"][str(layer)] for layer in layers], dtype=torch.float64)
        dropped = plan_drops(usage, alive, beta=0.1, cap=entry["cap"], target=1)
        assert {str(layer): dropped[m].nonzero().flatten().tolist() for m, layer in enumerate(layers)} == entry[
            "dropped"
        ]
        alive &= ~dropped
        assert alive.int().tolist() == entry["alive_mask"]
        assert (alive.sum(dim=1) <= entry["cap"]).all() and (alive.sum(dim=1) >= 1).all()
    kept = {int(layer): experts for layer, experts in record["kept"].items()}
    assert all(len(experts) == 1 for experts in kept.values())
    assert record["alive_mask"] == alive.int().tolist()
    assert {layer: alive[m].nonzero().flatten().tolist() for m, layer in enumerate(layers)} == kept

    # the pruned checkpoint: one expert per layer, top-1, plain transformers loads it; it is the kept expert
    pruned_dir, hf_dir = run_dir / PRUNED_DIR, run_dir / "hf"
    assert record["pruned_dir"] == str(pruned_dir)
    pruned = AutoModelForCausalLM.from_pretrained(pruned_dir, dtype=torch.float32).eval()
    assert pruned.config.num_experts == 1 and pruned.config.num_experts_per_tok == 1
    full = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    full_view, pruned_view = ExpertView(full), ExpertView(pruned)
    for layer, (expert,) in kept.items():
        want, got = full_view.read_expert((layer, expert)), pruned_view.read_expert((layer, 0))
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
        assert torch.equal(pruned_view.router_weight(layer)[0], full_view.router_weight(layer)[expert])
    # its logits are the masked full model's
    mask = AdditiveExpertMask(full)
    mask.set_dead(~alive)
    ids = torch.randint(3, full.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, full(ids).logits, atol=1e-5, rtol=1e-5)
    assert (run_dir / "progressive_prune_report.md").is_file()
    assert "Progressive pruning" in proc.stdout
    # the live run trained with the mask: the last logged metrics say one expert alive in every layer
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [m for m in metrics if "prune/alive_max" in m][-1]
    assert last["prune/alive_max"] == 1.0 and last["prune/windows_done"] == 3.0


# -- (4) resume continues the schedule exactly -----------------------------------------------------------------------


@pytest.mark.slow
def test_resume_continues_the_schedule_exactly(straight_run, data_cache):
    run_dir, _ = straight_run
    root = run_dir.parent.parent
    # stop after 4 steps (window 1 done at step 3, window 2 half counted), then rerun to the end
    run_train(train_args(data_cache, "resumed", "train.stop_after=4"), root)
    first = root / "runs" / "resumed"
    assert json.loads((first / JSON_FILE).read_text())["windows_done"] == 1
    assert not (first / PRUNED_DIR).exists()
    proc = run_train(train_args(data_cache, "resumed"), root)
    assert "resumed from" in proc.stdout + proc.stderr
    straight = json.loads((run_dir / JSON_FILE).read_text())
    resumed = json.loads((first / JSON_FILE).read_text())
    assert resumed["windows"] == straight["windows"] and resumed["kept"] == straight["kept"]
    a, b = load_file(run_dir / PRUNED_DIR / "model.safetensors"), load_file(first / PRUNED_DIR / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
