"""Slice-exact gradient masks (connito.training.grad_masks and the ``trainable`` callback).

The contract: inside fused expert tensors the frozen slices stay bit-identical through any number of AdamW steps
with weight decay and gradient clipping, under ZeRO 0/1/2 at ep 1 and 2, also after an expert leaves the trainable
set mid-run (no decay, no stale momentum); parameters with nothing to train get no gradient and no optimizer state;
trainable slices follow the reference of :mod:`tests.training.grad_mask_reference` (the chosen experts as separate
parameters, trained alone): bit for bit at ep 1, and at ep 2 within what AutoEP's own kernels allow (see
``EP2_UPDATE_RTOL``).

Default run: the mechanism without an engine, one process at ZeRO 0, and ZeRO 2 on 2 ranks at ep 1 and 2 (with a
resume). The rest of the ZeRO 0/1/2 x ep 1/2 matrix is marked slow.
"""

import json
from types import SimpleNamespace

import pytest
import torch

from connito.experts import ExpertMask, ExpertView
from connito.training.callbacks import CallbackError
from connito.training.callbacks.trainable import Trainable
from connito.training.grad_masks import check_engine, freeze_untrainable
from connito.training.trainable_set import GradientMaskError, TrainableSet, resolve_masks
from connito.training.zero_partitions import complement, merge_ranges, optimizer_tensors, rows_to_ranges
from tests.experts.conftest import build_tiny
from tests.helpers import REPO, compose_train, small_overrides, torchrun
from tests.training.grad_mask_reference import EngineArithmetic, reference_run

# The run every engine test trains: 4 experts of the tiny Qwen3-MoE (layer 3 has none: its expert tensors are
# frozen whole), the routers and the final norm whole; expert (2, 2) leaves the set after step 10.
EXPERTS = [(0, 1), (1, 0), (1, 5), (2, 2)]
WHOLE = ("model.norm.weight",) + tuple(f"model.layers.{layer}.mlp.gate.weight" for layer in range(4))
FREEZE_AFTER = {"step": 10, "experts": [[2, 2]]}
DUMP_STEPS = (1, 10, 20)
CLIP = 0.05  # below every step's gradient norm (asserted), so clipping acts at every step
# AutoEP sums expert gradients in another order than transformers (its own ep parity tests allow rtol 1e-5 on
# gradients). Adam divides by the gradient's magnitude: on elements whose gradient is near eps (1e-8) a last-bit
# difference changes the update by up to ~0.3% of one step's lr. Measured: the trainable tensors' updates differ
# from the reference by <= 1.8e-5 of their norm at ep 2 (ZeRO 0/1/2) through step 10, by 0 at ep 1. Later, the
# drift can flip a near-tied top-k choice (masked or not), which changes router gradients discontinuously (seen at
# ZeRO 0, step 20: 2.6e-4 on a router): ep 2 is compared through step 10; frozen slices at every step.
EP2_UPDATE_RTOL = 1e-4
EP2_COMPARED_STEPS = (1, 10)


def base_overrides(cache) -> list[str]:
    return small_overrides(cache) + [
        "train.steps=20",
        "train.grad_accum=2",
        "train.eval_every=0",
        "train.eval_batches=1",
        "train.checkpoint_every=0",
        "train.export=false",
        "optim.warmup_steps=2",
        f"optim.grad_clip={CLIP}",
        "+callbacks.trainable.routers=true",
        "+callbacks.trainable.modules=[model.norm.weight]",
    ]


# -- the mechanism, no engine ------------------------------------------------------------------------------------


def test_ranges_follow_rows_and_merge():
    keep = torch.tensor([True, True, False, True, False, False, True])
    assert rows_to_ranges(keep, 10) == [(0, 20), (30, 40), (60, 70)]
    assert merge_ranges([(30, 40), (0, 10), (10, 20), (35, 50), (60, 60)]) == [(0, 20), (30, 50)]
    assert complement([(0, 20), (30, 40)], 50) == [(20, 30), (40, 50)]
    assert complement([], 5) == [(0, 5)]


def test_masks_cut_expert_rows_and_train_shared_experts_routers_and_modules_only_when_asked():
    model = build_tiny("qwen2_moe")
    view = ExpertView(model)
    experts = ExpertMask.from_ids([(0, 3), (2, 0), (2, 7)], view.num_layers, view.num_experts, view.moe_layers)
    by_name = {m.name: m for m in resolve_masks(model, TrainableSet(experts))}
    gate_up = by_name["model.layers.2.mlp.experts.gate_up_proj"]
    assert gate_up.keep_R.tolist() == [True] + [False] * 6 + [True]
    assert gate_up.ranges() == [(0, gate_up.param[0].numel()), (7 * gate_up.param[0].numel(), gate_up.param.numel())]
    assert not by_name["model.layers.1.mlp.experts.down_proj"].any
    trained = {name for name, m in by_name.items() if m.any}
    assert all(".experts." in name for name in trained)  # default: the selected experts alone

    wide = TrainableSet(experts, shared_experts=True, routers=True, modules=("model.layers.0.self_attn.q_proj.*",))
    masks = {m.name: m for m in resolve_masks(model, wide)}
    assert masks["model.layers.1.mlp.gate.weight"].all
    assert masks["model.layers.1.mlp.shared_expert.down_proj.weight"].all
    assert masks["model.layers.1.mlp.shared_expert_gate.weight"].all
    assert masks["model.layers.0.self_attn.q_proj.weight"].all and masks["model.layers.0.self_attn.q_proj.bias"].all
    assert not masks["model.layers.0.self_attn.k_proj.weight"].any
    assert not masks["model.embed_tokens.weight"].any


def test_a_module_glob_matches_tied_names_and_a_glob_that_matches_nothing_is_refused():
    model = build_tiny("qwen3_moe", tie_word_embeddings=True)
    view = ExpertView(model)
    tied = TrainableSet(view.empty_mask(), modules=("lm_head.weight",))
    assert {m.name for m in resolve_masks(model, tied) if m.any} == {"model.embed_tokens.weight"}
    with pytest.raises(GradientMaskError, match=r"modules: 'model\.layers\.\*\.mlp\.gait\.\*' matches no parameter"):
        resolve_masks(model, TrainableSet(view.empty_mask(), modules=("model.layers.*.mlp.gait.*",)))


def test_a_mask_of_another_model_is_refused():
    model = build_tiny("deepseek_v2")  # layer 0 is dense
    wrong = ExpertMask.empty(3, 8, [0, 1, 2])
    with pytest.raises(GradientMaskError, match=r"MoE layers \[0, 1, 2\]; the model has 3 layers x 8 experts, MoE"):
        resolve_masks(model, TrainableSet(wrong))


@pytest.mark.parametrize("lean", [False, True], ids=["mask-only", "lean"])
def test_freezing_leaves_gradients_only_where_something_trains(lean):
    model = build_tiny("qwen3_moe")
    view = ExpertView(model)
    experts = ExpertMask.from_ids([(1, 2)], view.num_layers, view.num_experts, view.moe_layers)
    report = freeze_untrainable(model, TrainableSet(experts, routers=True), lean=lean)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # mask-only: the fused tensors of layer 1 train, masked to expert 2; lean: expert 2 alone is a parameter
    where = "model.layers.1.lean_experts" if lean else "model.layers.1.mlp.experts"
    assert trainable == {f"model.layers.{i}.mlp.gate.weight" for i in range(3)} | {
        f"{where}.gate_up_proj",
        f"{where}.down_proj",
    }
    assert report.masked == ([] if lean else [f"{where}.gate_up_proj", f"{where}.down_proj"])
    if lean:
        assert report.lean.layers == [1] and model.model.layers[1].lean_experts.global_ids == [2]
    per_expert = sum(p[0].numel() for n, p in model.named_parameters() if "layers.1.mlp.experts" in n)
    routers = sum(p.numel() for n, p in model.named_parameters() if n.endswith("mlp.gate.weight"))
    assert report.trainable_numel == per_expert + routers
    with pytest.raises(GradientMaskError, match="the trainable set selects nothing"):
        freeze_untrainable(build_tiny("qwen3_moe"), TrainableSet(view.empty_mask()))


def test_trainable_sets_round_trip_through_json():
    model = build_tiny("qwen2_moe")
    view = ExpertView(model)
    experts = ExpertMask.from_ids([(0, 1), (2, 6)], view.num_layers, view.num_experts, view.moe_layers)
    original = TrainableSet(experts, shared_experts=True, routers=False, modules=("lm_head.weight",))
    assert TrainableSet.from_dict(json.loads(json.dumps(original.to_dict()))) == original


def test_the_callback_refuses_ambiguous_or_unreadable_options(tmp_path):
    with pytest.raises(CallbackError, match="exactly one of mask_file"):
        Trainable()
    with pytest.raises(CallbackError, match="exactly one of mask_file"):
        Trainable(mask_file="m.json", experts=[[0, 1]])
    with pytest.raises(CallbackError, match="is not a file"):
        Trainable(mask_file=str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text('{"shape": [3, 8]}')
    view = ExpertView(build_tiny("qwen3_moe"))
    with pytest.raises(CallbackError, match="is not an expert mask: expert mask JSON is missing"):
        Trainable(mask_file=str(bad)).trainable_set(view)
    with pytest.raises(GradientMaskError, match="experts: expert 9 is out of range"):
        Trainable(experts=[[1, 9]]).trainable_set(view)


def test_zero_partitions_carry_each_fragment_s_ranges():
    """A rank's flat partition holds the tail of parameter a (elements 6..9 at 0..3) and the head of b (elements
    0..5 at 4..9); only b's row 1 (elements 3..5) and all of a (unmasked) are trainable."""
    a, b = torch.zeros(10), torch.zeros(4, 3)
    a._hp_mapping = SimpleNamespace(lp_fragment_address=SimpleNamespace(start=6, numel=4),
                                    hp_fragment_address=SimpleNamespace(start=0, numel=4))  # fmt: skip
    b._hp_mapping = SimpleNamespace(lp_fragment_address=SimpleNamespace(start=0, numel=6),
                                    hp_fragment_address=SimpleNamespace(start=4, numel=6))  # fmt: skip
    flat = torch.zeros(10)
    zero = SimpleNamespace(bit16_groups=[[a, b]], single_partition_of_fp32_groups=[flat])
    engine = SimpleNamespace(zero_optimization_stage=lambda: 2, optimizer=zero)
    ranges = {id(b): rows_to_ranges(torch.tensor([False, True, False, True]), 3)}
    (entry,) = optimizer_tensors(engine, None, ranges).values()
    assert entry.tensor is flat and entry.trainable == [(0, 4), (7, 10)]
    (entry,) = optimizer_tensors(engine, None, {}).values()
    assert entry.trainable is None  # nothing masked in this partition: the optimizer is left alone


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"stage": 3}, "ZeRO-3 partitions every parameter"),
        ({"bf16": True}, "Set engine.precision=fp32"),
        ({"offload": True}, "Set engine.offload_optimizer=false"),
        ({"coupled": True}, r"use AdamW \(decoupled weight decay\)"),
    ],
)
def test_engines_the_mask_cannot_make_exact_are_refused_with_the_fix(settings, words):
    param = torch.nn.Parameter(torch.zeros(2, 2))
    if settings.get("coupled"):
        inner = torch.optim.Adam([param], weight_decay=0.1)
    else:
        inner = torch.optim.AdamW([param], weight_decay=0.1)
    engine = SimpleNamespace(
        zero_optimization_stage=lambda: settings.get("stage", 1),
        bfloat16_enabled=lambda: settings.get("bf16", False),
        fp16_enabled=lambda: False,
        optimizer=SimpleNamespace(cpu_offload=settings.get("offload", False)),
    )
    with pytest.raises(GradientMaskError, match=words):
        check_engine(engine, inner)


def test_a_masked_run_refuses_bf16_before_the_engine_is_built(data_cache, tmp_path):
    from connito.training.trainer import run_training

    overrides = small_overrides(data_cache) + ["engine.precision=bf16", "+callbacks.trainable.experts=[[0,1]]"]
    with pytest.raises(GradientMaskError, match="exact in fp32 only .* Set engine.precision=fp32"):
        run_training(compose_train(overrides), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


# -- one process, ZeRO 0 -----------------------------------------------------------------------------------------


def test_zero0_frozen_slices_stay_bit_identical_and_trainable_ones_match_the_separate_parameter_reference(
    data_cache, tmp_path
):
    from connito.training.trainer import run_training
    from tests.training.grad_mask_worker import Dump, optimizer_report

    mask_file = tmp_path / "mask.json"
    mask_file.write_text(ExpertMask.from_ids(EXPERTS, 4, 8, range(4)).to_json())  # the tiny Qwen3-MoE's shape
    overrides = base_overrides(data_cache) + [f"+callbacks.trainable.mask_file={mask_file}"]
    dump = Dump(tmp_path, list(DUMP_STEPS), FREEZE_AFTER)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the reference runs on one thread: the same kernels sum in the same order
    try:
        result = run_training(compose_train(overrides), tmp_path / "run", callbacks=[dump])
    finally:
        torch.set_num_threads(threads)
    reference = reference_run(compose_train(overrides), EXPERTS, EngineArithmetic(), WHOLE, DUMP_STEPS, FREEZE_AFTER)

    assert min(reference.norms) > CLIP
    assert_frozen_bit_identical(tmp_path)
    for step in DUMP_STEPS:
        assert_same_bits(torch.load(tmp_path / f"step{step}.pt"), reference.states[step], f"step {step}")
    # No gradient and no optimizer state for what has nothing to train; the saved set is the starting one.
    model, engine = result.model, result.engine
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert all(p.grad is None for p in frozen)
    state = engine.optimizer.state
    assert {id(p) for p in state} == {id(p) for p in model.parameters() if p.requires_grad}
    assert "model.layers.3.mlp.experts.gate_up_proj" not in {n for n, p in model.named_parameters() if p.requires_grad}
    report = optimizer_report(engine)
    assert report["frozen_in_optimizer"] == 0 and report["exp_avg_numel"] == report["trainable_tensor_numel"]
    saved = json.loads((tmp_path / "run" / "trainable.json").read_text())
    assert ExpertMask.from_dict(saved["experts"]).ids() == sorted(EXPERTS)


def assert_same_bits(actual: dict, expected: dict, where: str) -> None:
    assert set(actual) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), f"{where}: {name} differs by {(actual[name] - tensor).abs().max()}"


def assert_frozen_bit_identical(case_dir) -> None:
    """Everything outside the trainable set equals the initial model bit for bit after 20 steps; expert (2, 2)
    equals itself after step 10, where it left the set, and moved before."""
    initial = torch.load(case_dir / "initial.pt")
    at10, final = torch.load(case_dir / "step10.pt"), torch.load(case_dir / "step20.pt")
    assert set(final) == set(initial)
    for name, tensor in initial.items():
        if name in WHOLE:
            assert not torch.equal(final[name], tensor), name
            continue
        if ".experts." not in name:
            assert torch.equal(final[name], tensor), name
            continue
        layer = int(name.split(".")[2])
        chosen = [e for lay, e in EXPERTS if lay == layer]
        frozen = [e for e in range(tensor.shape[0]) if e not in chosen]
        assert torch.equal(final[name][frozen], tensor[frozen]), name
        for expert in chosen:
            assert not torch.equal(at10[name][expert], tensor[expert]), (name, expert)
        if layer == 2:
            assert torch.equal(final[name][2], at10[name][2]), f"{name}: expert 2 moved after leaving the set"


# -- 2 ranks: ZeRO 0/1/2 x ep 1/2 --------------------------------------------------------------------------------

CASES = {
    "zero2-ep1": ["engine=zero2", "parallel.ep_size=1"],
    "zero2-ep2": ["engine=zero2", "parallel.ep_size=2"],
    "zero0-ep1": ["engine=zero0", "parallel.ep_size=1"],
    "zero0-ep2": ["engine=zero0", "parallel.ep_size=2"],
    "zero1-ep1": ["engine=zero1", "parallel.ep_size=1"],
    "zero1-ep2": ["engine=zero1", "parallel.ep_size=2"],
}
DEFAULT_CASES = ("zero2-ep2",)  # the rest of the ZeRO x ep matrix runs with -m slow
# The resumed case stops after step 12 (after expert (2, 2) left the set) and resumes: the restored mask and the
# re-linked ZeRO partitions must give the straight run's bits.
RESUMED = "zero2-ep2-resumed"
DEFAULT_GROUP = (*DEFAULT_CASES, RESUMED)
SLOW_GROUP = tuple(name for name in CASES if name not in DEFAULT_CASES)


class Matrix:
    """Each group of cases trains once per session, in one torchrun of 2 ranks (one engine per case)."""

    def __init__(self, root, cache):
        self.root, self.cache, self.done = root, cache, set()

    def case_dir(self, name: str):
        group = DEFAULT_GROUP if name in DEFAULT_GROUP else SLOW_GROUP
        if group not in self.done:
            cases = {}
            for case in group:
                overrides = CASES["zero2-ep2"] if case == RESUMED else CASES[case]
                cases[case] = {"overrides": overrides, "freeze_after": FREEZE_AFTER}
                if case == RESUMED:
                    cases[case]["stop_after"] = 12
            spec = {"out": str(self.root), "base": self.overrides(), "dump_steps": list(DUMP_STEPS), "cases": cases}
            spec_file = self.root / f"cases{len(self.done)}.json"
            spec_file.write_text(json.dumps(spec))
            proc = torchrun(2, REPO / "tests" / "training" / "grad_mask_worker.py", [str(spec_file)], timeout=600)
            assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-6000:])
            self.done.add(group)
        return self.root / name

    def overrides(self) -> list[str]:
        experts = json.dumps([list(e) for e in EXPERTS]).replace(" ", "")
        return base_overrides(self.cache) + [f"+callbacks.trainable.experts={experts}"]


@pytest.fixture(scope="session")
def matrix(tmp_path_factory, data_cache):
    return Matrix(tmp_path_factory.mktemp("grad-mask-matrix"), data_cache)


def reported_norms(case_dir) -> list[float] | None:
    records = [json.loads(line) for line in (case_dir / "run" / "metrics.jsonl").read_text().splitlines()]
    norms = [r["train/grad_norm"] for r in records if "train/grad_norm" in r]
    return norms or None


@pytest.mark.distributed
@pytest.mark.parametrize(
    "case", [pytest.param(name, marks=() if name in DEFAULT_CASES else (pytest.mark.slow,)) for name in CASES]
)
def test_two_ranks_keep_frozen_slices_bit_identical_and_train_the_rest_as_the_reference(matrix, case):
    case_dir = matrix.case_dir(case)
    assert_frozen_bit_identical(case_dir)
    zero_stage, ep_size = (int(part[-1]) for part in case.split("-"))
    # No optimizer state for what has nothing to train: no frozen parameter reached the optimizer, and the AdamW
    # state is the trainable tensors' size: per rank at ZeRO 0; at ZeRO 1/2 partitioned over the ranks (each
    # expert shard counted once per expert-data-parallel group), plus alignment padding.
    reports = [json.loads((case_dir / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["frozen_in_optimizer"] == 0 for r in reports)
    state = [r["exp_avg_numel"] for r in reports]
    if zero_stage == 0:
        assert state == [r["trainable_tensor_numel"] for r in reports]
    else:
        experts = sum(r["trainable_expert_numel"] for r in reports) // (2 // ep_size)
        expected = experts + reports[0]["trainable_tensor_numel"] - reports[0]["trainable_expert_numel"]
        assert expected <= sum(state) < expected + 1024
    # Lean training: every fused expert tensor (gate_up_proj, down_proj / AutoEP's w1, w2, w3) is frozen storage;
    # the trainable experts of layers 0-2 live in compact slots, each rank holding (and keeping AdamW state for)
    # only its own trainable experts, padded at ep 2 to the largest count over the ranks (1 per layer here).
    per_layer = 2 if ep_size == 1 else 3
    for report in reports:
        frozen_experts = report["frozen_expert_tensors"]
        assert len(frozen_experts) == 4 * per_layer and all(".mlp.experts." in name for name in frozen_experts)
        assert report["trainable_expert_numel"] == report["lean_slot_numel"]
    slot = {1: 4, 2: 3}[ep_size]  # slots per rank: ep 1 all 4 chosen experts, ep 2 one per layer 0-2
    expert_numel = reports[0]["fused_expert_numel"] // (4 * 8 // ep_size)
    assert all(r["lean_slot_numel"] == slot * expert_numel for r in reports)
    if zero_stage == 0:  # by bytes: exp_avg and exp_avg_sq (fp32) of the trainable tensors, nothing of the rest
        for r in reports:
            assert r["state_bytes"] - r["step_bytes"] == 2 * 4 * r["trainable_tensor_numel"]

    cfg = compose_train(matrix.overrides() + CASES[case])
    norms = reported_norms(case_dir) if zero_stage else None
    arithmetic = EngineArithmetic(world=2, zero_stage=zero_stage, ep_size=ep_size, norms=norms)
    reference = reference_run(cfg, EXPERTS, arithmetic, WHOLE, DUMP_STEPS, FREEZE_AFTER)
    assert min(reference.norms) > CLIP
    if norms is not None:  # the norm DeepSpeed clipped by is the norm of the trainable gradients alone
        torch.testing.assert_close(torch.tensor(norms), torch.tensor(reference.norms), rtol=1e-6, atol=0)
    initial = torch.load(case_dir / "initial.pt")
    for step in DUMP_STEPS if ep_size == 1 else EP2_COMPARED_STEPS:
        actual = torch.load(case_dir / f"step{step}.pt")
        if ep_size == 1:
            assert_same_bits(actual, reference.states[step], f"{case} step {step}")
            continue
        for name, expected in reference.states[step].items():
            update, expected_update = actual[name] - initial[name], expected - initial[name]
            error = (update - expected_update).norm() / expected_update.norm().clamp_min(1e-30)
            assert error <= EP2_UPDATE_RTOL or expected_update.norm() == 0, f"{case} step {step} {name}: {error}"


@pytest.mark.distributed
def test_a_resumed_masked_run_continues_with_the_mask_it_saved(matrix):
    """Stopped after step 12 (expert (2, 2) already out of the set) and resumed: the checkpoint restores the
    narrowed set and DeepSpeed's re-linked ZeRO-2 partitions get the mask again: the straight run's bits."""
    resumed = matrix.case_dir(RESUMED)
    straight = matrix.case_dir("zero2-ep2")
    assert_same_bits(torch.load(resumed / "step20.pt"), torch.load(straight / "step20.pt"), "resumed vs straight")
    saved = torch.load(resumed / "run" / "checkpoints" / "step_000012" / "callback_state.pt", weights_only=True)
    assert (2, 2) not in ExpertMask.from_dict(saved["trainable"]["trainable"]["experts"]).ids()


# -- router rows (FlexOLMo: an owner trains its expert and its router row) ---------------------------------------


def test_router_rows_cut_each_router_to_the_trainable_experts_rows():
    model = build_tiny("qwen3_moe")
    view = ExpertView(model)
    experts = ExpertMask.from_ids([(0, 1), (2, 3), (2, 6)], view.num_layers, view.num_experts, view.moe_layers)
    trainable = TrainableSet(experts, router_rows=True)
    masks = {m.name: m for m in resolve_masks(model, trainable)}
    assert masks["model.layers.0.mlp.gate.weight"].keep_R.nonzero().flatten().tolist() == [1]
    assert masks["model.layers.2.mlp.gate.weight"].keep_R.nonzero().flatten().tolist() == [3, 6]
    assert not masks["model.layers.1.mlp.gate.weight"].any  # no trainable expert: the router is frozen whole
    row = model.config.hidden_size
    assert masks["model.layers.2.mlp.gate.weight"].ranges() == [(3 * row, 4 * row), (6 * row, 7 * row)]
    assert {name for name, m in masks.items() if m.any} == {
        "model.layers.0.mlp.gate.weight",
        "model.layers.2.mlp.gate.weight",
        *(f"model.layers.{layer}.mlp.experts.{p}" for layer in (0, 2) for p in ("gate_up_proj", "down_proj")),
    }
    report = freeze_untrainable(model, trainable)
    assert "model.layers.1.mlp.gate.weight" in report.frozen
    assert {"model.layers.0.mlp.gate.weight", "model.layers.2.mlp.gate.weight"} <= set(report.masked)

    assert TrainableSet.from_dict(json.loads(json.dumps(trainable.to_dict()))) == trainable
    legacy = {k: v for k, v in trainable.to_dict().items() if k != "router_rows"}
    assert TrainableSet.from_dict(legacy).router_rows is False  # sets saved before router_rows existed
    with pytest.raises(GradientMaskError, match="routers=true trains every router whole .* choose one"):
        TrainableSet(experts, routers=True, router_rows=True)
    with pytest.raises(CallbackError, match="routers=true trains every router whole.* set one of them"):
        Trainable(experts=[[0, 1]], routers=True, router_rows=True)
    assert Trainable(experts=[[0, 1]], router_rows=True).trainable_set(view).router_rows

    # A router bias [E] (none of the built-in families has one) is cut by the same rows; a router parameter without
    # a row per expert cannot be cut and is refused.
    gate = model.model.layers[2].mlp.gate
    gate.bias = torch.nn.Parameter(torch.zeros(view.num_experts))
    masks = {m.name: m for m in resolve_masks(model, trainable)}
    assert masks["model.layers.2.mlp.gate.bias"].keep_R.nonzero().flatten().tolist() == [3, 6]
    gate.scale = torch.nn.Parameter(torch.ones(1))
    with pytest.raises(GradientMaskError, match=r"holds 'scale' of shape \[1\], which has no row per expert"):
        resolve_masks(model, trainable)


def test_zero0_router_rows_train_row_1_and_expert_1_of_a_mixtral_and_nothing_else(data_cache, tmp_path):
    """Tiny Mixtral, experts [[l, 1] for every layer] with router_rows, AdamW with weight decay: after 4 steps every
    router row but 1, every other expert and every non-expert tensor are the start's bits; row 1 and expert 1
    moved, and at step 1 by exactly what a run training the routers whole gives them (a row's gradient and update
    do not depend on the other rows)."""
    from connito.training.trainer import run_training
    from tests.training.grad_mask_worker import Dump

    layers = 4
    experts = json.dumps([[layer, 1] for layer in range(layers)]).replace(" ", "")
    base = small_overrides(data_cache) + [
        "model=mixtral_tiny",
        "train.eval_every=0",
        "train.checkpoint_every=0",
        "train.export=false",
        "optim.warmup_steps=2",
        "optim.grad_clip=0",  # no global-norm clipping: the whole-router run's norm differs
        f"+callbacks.trainable.experts={experts}",
    ]
    rows_dir, whole_dir = tmp_path / "rows", tmp_path / "whole"
    rows_dir.mkdir(), whole_dir.mkdir()
    rows = base + ["train.steps=4", "+callbacks.trainable.router_rows=true"]
    run_training(compose_train(rows), rows_dir / "run", callbacks=[Dump(rows_dir, [1, 4], None)])
    whole = base + ["train.steps=1", "+callbacks.trainable.routers=true"]
    run_training(compose_train(whole), whole_dir / "run", callbacks=[Dump(whole_dir, [1], None)])

    initial, final = torch.load(rows_dir / "initial.pt"), torch.load(rows_dir / "step4.pt")
    first, whole_first = torch.load(rows_dir / "step1.pt"), torch.load(whole_dir / "step1.pt")
    assert set(final) == set(initial)
    for name, tensor in initial.items():
        if name.endswith(".mlp.gate.weight") or ".mlp.experts." in name:
            others = [row for row in range(tensor.shape[0]) if row != 1]
            assert torch.equal(final[name][others], tensor[others]), name
            assert not torch.equal(final[name][1], tensor[1]), name
            assert torch.equal(first[name][1], whole_first[name][1]), name
        else:
            assert torch.equal(final[name], tensor), name
    assert sum(name.endswith(".mlp.gate.weight") for name in initial) == layers


@pytest.mark.slow
@pytest.mark.distributed
def test_router_rows_under_expert_parallelism_keep_the_other_rows_bit_identical(data_cache, tmp_path):
    """2 ranks, ZeRO 2, ep 2 (AutoEP's ``router.gate`` holds the [E, H] rows of all global experts on every rank):
    the same contract as at ZeRO 0. Also measured at ZeRO 0 and 1 with ep 2."""
    experts = json.dumps([[layer, 1] for layer in range(4)]).replace(" ", "")
    base = small_overrides(data_cache) + [
        "model=mixtral_tiny", "train.steps=4", "train.eval_every=0", "train.checkpoint_every=0", "train.export=false",
        "optim.warmup_steps=2", f"+callbacks.trainable.experts={experts}", "+callbacks.trainable.router_rows=true",
    ]  # fmt: skip
    cases = {"zero2-ep2": {"overrides": CASES["zero2-ep2"]}}
    spec_file = tmp_path / "cases.json"
    spec_file.write_text(json.dumps({"out": str(tmp_path), "base": base, "dump_steps": [4], "cases": cases}))
    proc = torchrun(2, REPO / "tests" / "training" / "grad_mask_worker.py", [str(spec_file)], timeout=600)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-6000:])
    initial, final = torch.load(tmp_path / "zero2-ep2" / "initial.pt"), torch.load(tmp_path / "zero2-ep2" / "step4.pt")
    for name, tensor in initial.items():
        if name.endswith(".mlp.gate.weight") or ".mlp.experts." in name:
            others = [row for row in range(tensor.shape[0]) if row != 1]
            assert torch.equal(final[name][others], tensor[others]), name
            assert not torch.equal(final[name][1], tensor[1]), name
        else:
            assert torch.equal(final[name], tensor), name
