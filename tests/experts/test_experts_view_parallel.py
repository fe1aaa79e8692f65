"""The expert view of a live trained model in every layout (gloo, CPU), against its HF export.

One torchrun per (family, layout) trains one step with ``train.export=true`` (``tests/experts/view_worker.py``);
every rank reports what ``ExpertView(result.model)`` says and reads, and these tests compare it with the export
loaded in plain transformers: ep 1 (1 rank), ep 2 (2 ranks: each holds 4 of the 8 experts of a layer) and
ep 2 x dp 2 (4 ranks: two expert-parallel groups). The default run covers qwen3_moe in every layout and
deepseek_v3 (a dense first layer, a shared expert, a choice bias) at ep 2; every other case is slow.
"""

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from connito.experts import ExpertView
from connito.models import get_family
from tests.experts.view_worker import CHOICE_BIAS_SCALE, FAMILY_OVERRIDES, LAYOUTS, view_run
from tests.helpers import REPO

pytestmark = pytest.mark.distributed

# the default run: one family at every layout but the 4-rank one (~25 s; it and the other families run in the slow set)
DEFAULT_RUN = {("qwen3_moe", "ep1"), ("qwen3_moe", "ep2")}
SHARED_EXPERTS = {"qwen2_moe", "deepseek_v2", "deepseek_v3"}
SHARED_EXPERT_GATE = {"qwen2_moe"}
CHOICE_BIAS = {"deepseek_v3"}


def cases():
    for family in sorted(FAMILY_OVERRIDES):
        for layout in LAYOUTS:
            marks = () if (family, layout) in DEFAULT_RUN else (pytest.mark.slow,)
            yield pytest.param(family, layout, id=f"{family}-{layout}", marks=marks)


class ViewRun:
    def __init__(self, family: str, layout: str, run_dir):
        self.family, self.layout, self.dir = family, layout, run_dir
        self.ranks, self.ep_size = LAYOUTS[layout]
        self.reports = [torch.load(run_dir / f"rank{r}.pt") for r in range(self.ranks)]
        self.export = AutoModelForCausalLM.from_pretrained(run_dir / "hf", dtype="auto").eval()
        self.export_view = ExpertView(self.export)
        self.export_state = self.export.state_dict()


@pytest.fixture(scope="session")
def view_runs(tmp_path_factory, data_cache):
    root, loaded = tmp_path_factory.mktemp("view-runs"), {}

    def get(family: str, layout: str) -> ViewRun:
        if (family, layout) not in loaded:
            loaded[family, layout] = ViewRun(family, layout, view_run(family, layout, root, data_cache))
        return loaded[family, layout]

    return get


def configured_experts(family: str) -> int:
    """Routed experts per MoE layer as the family's tiny model config sets them (8; FlexOlmo 4)."""
    hf_config = OmegaConf.load(REPO / "configs" / "model" / f"{family}_tiny.yaml").hf_config
    return hf_config[get_family(family).layout.num_experts_key]


def all_ids(view: ExpertView) -> list[tuple[int, int]]:
    return [(layer, e) for layer in view.moe_layers for e in range(view.num_experts)]


@pytest.mark.parametrize(("family", "layout"), cases())
def test_view_finds_the_moe_layers_and_experts_of_the_unsharded_export(view_runs, family, layout):
    run = view_runs(family, layout)
    export_moe_layers = [i for i, layer in enumerate(run.export.model.layers) if hasattr(layer.mlp, "experts")]
    assert run.export_view.moe_layers == export_moe_layers
    if family.startswith("deepseek"):
        assert export_moe_layers[0] == 1  # first_k_dense_replace=1: layer 0 is dense
    num_experts = getattr(run.export.config, run.export_view.layout.num_experts_key)
    assert num_experts == run.export_view.num_experts == configured_experts(family)
    for report in run.reports:
        assert report["moe_layers"] == export_moe_layers
        assert report["num_experts"] == num_experts
        assert report["ep_size"] == run.ep_size


@pytest.mark.parametrize(("family", "layout"), cases())
def test_read_expert_gives_the_exported_tensors_for_every_expert_on_every_rank(view_runs, family, layout):
    run = view_runs(family, layout)
    ids = all_ids(run.export_view)
    for report in run.reports:
        assert list(report["read"]) == ids
        for layer, e in ids:
            expected = run.export_view.read_expert((layer, e))
            got = report["read"][layer, e]
            assert sorted(got) == ["down_proj", "gate_up_proj"]
            for name, tensor in expected.items():
                prefix = f"model.layers.{layer}.mlp.experts.{name}"
                assert torch.equal(tensor, run.export_state[prefix][e])
                assert torch.equal(got[name], tensor), f"rank {report['rank']} expert {(layer, e)} {name}"


@pytest.mark.parametrize(("family", "layout"), cases())
def test_owner_and_holds_follow_the_contiguous_expert_placement(view_runs, family, layout):
    """Expert e of every layer lives on expert-parallel rank e // (E / ep); DeepSpeed's expert-parallel groups are
    consecutive global ranks, so global rank r holds the r % ep block."""
    run = view_runs(family, layout)
    per_rank = run.export_view.num_experts // run.ep_size
    ids = all_ids(run.export_view)
    for report in run.reports:
        ep_rank = report["rank"] % run.ep_size
        assert report["ep_rank"] == ep_rank
        assert report["owner"] == {(layer, e): e // per_rank for layer, e in ids}
        held = {(layer, e) for (layer, e), holds in report["holds"].items() if holds}
        assert held == {(layer, e) for layer, e in ids if ep_rank * per_rank <= e < (ep_rank + 1) * per_rank}
    group = run.reports[: run.ep_size]  # one expert-parallel group holds every expert exactly once
    assert all(sum(report["holds"][i] for report in group) == 1 for i in ids)


@pytest.mark.parametrize(("family", "layout"), cases())
def test_count_parameters_equals_the_export_on_every_rank(view_runs, family, layout):
    run = view_runs(family, layout)
    count = run.export_view.count_parameters()
    assert count.non_expert + count.num_routed_experts * count.per_expert == sum(
        p.numel() for p in run.export.parameters()
    )
    assert count.num_routed_experts == len(run.export_view.moe_layers) * configured_experts(family)
    for report in run.reports:
        assert report["count"] == tuple(count)


@pytest.mark.parametrize(("family", "layout"), cases())
def test_choice_bias_and_shared_experts_are_the_exported_ones(view_runs, family, layout):
    """The worker gave every DeepSeek-V3 router a distinct random choice bias (through the modules, not the view)
    before training; the view reads it back per layer as the export holds it."""
    run = view_runs(family, layout)
    layers = run.export_view.moe_layers
    for report in run.reports:
        assert report["shared_experts"] == {layer: family in SHARED_EXPERTS for layer in layers}
        assert report["shared_expert_gate"] == {layer: family in SHARED_EXPERT_GATE for layer in layers}
        if family not in CHOICE_BIAS:
            assert report["choice_bias"] == {layer: None for layer in layers}
            continue
        for layer in layers:
            exported = run.export_state[f"model.layers.{layer}.mlp.gate.e_score_correction_bias"]
            assert torch.equal(report["choice_bias"][layer], exported)
            generator = torch.Generator().manual_seed(100 + layer)
            assert torch.equal(exported, CHOICE_BIAS_SCALE * torch.randn(exported.shape, generator=generator))


@pytest.mark.parametrize(("family", "layout"), cases())
def test_write_expert_changes_exactly_that_expert_in_the_gathered_state(view_runs, family, layout):
    """Every rank wrote known tensors into expert (last MoE layer, 1 + first expert of the last ep rank); the state
    gathered before the write is the export, and after it differs from it in that expert's slices only."""
    run = view_runs(family, layout)
    saved = torch.load(run.dir / "write.pt")
    layer, expert = saved["expert"]
    before, after, written = saved["before"], saved["after"], saved["written"]
    assert layer == run.export_view.moe_layers[-1]
    assert run.reports[0]["owner"][layer, expert] == run.ep_size - 1

    assert set(before) == set(after) == set(run.export_state)
    for name, tensor in run.export_state.items():
        assert torch.equal(before[name], tensor), name
    changed = {f"model.layers.{layer}.mlp.experts.{n}": n for n in ("gate_up_proj", "down_proj")}
    for name, tensor in before.items():
        if name not in changed:
            assert torch.equal(after[name], tensor), name
            continue
        new = written[changed[name]]
        assert not torch.equal(tensor[expert], new)
        assert torch.equal(after[name][expert], new)
        others = [e for e in range(tensor.shape[0]) if e != expert]
        assert torch.equal(after[name][others], tensor[others])
    for report in run.reports:  # read back (a collective) on every rank, the holder's write included
        assert report["write_target"] == (layer, expert)
        assert all(torch.equal(report["read_after_write"][n], written[n]) for n in written)
