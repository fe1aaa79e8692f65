"""Each workaround of :mod:`connito.training.deepspeed_internals` against the installed DeepSpeed, on CPU in this
process (world size 1, gloo): tiny engines built the way :mod:`connito.training.engine` builds them (a torch AdamW
with a LambdaLR schedule; AutoEP at ``autoep_size`` 1 for the expert files). A DeepSpeed upgrade that renames an
attribute, a file or a format fails here, one test per workaround, before any training test."""

import ast
import re
from importlib import metadata
from pathlib import Path

import pytest
import torch
from packaging.version import Version
from torch import nn

from connito.models.families import get_family
from connito.parallel import autoep_layers
from connito.parallel.expert_parallel import DEEPSPEED_VERSION
from connito.training import deepspeed_internals as ds_internals
from connito.training.deepspeed_internals import (
    ENGINE_COUNTERS,
    MODEL_STATES_FILE,
    TESTED_DEEPSPEED,
    UNIVERSAL_OPTIMIZER_FILE,
    UNIVERSAL_STEP_FILE,
    DeepSpeedVersionError,
    autoep_layer_table,
    can_skip_update,
    check_deepspeed_version,
    convert_to_universal,
    engine_state,
    expert_optimizer_file,
    inner_optimizer,
    offloads_optimizer,
    read_expert_optimizer,
    read_expert_states,
    read_model_states,
    read_universal_state,
    restore_frozen_expert_shards,
    set_engine_counters,
    skipped_update,
    write_universal_state,
    zero_partitions,
)
from connito.training.distributed import init_distributed
from tests.experts.conftest import build_tiny
from tests.helpers import REPO


def build(model: nn.Module, stage: int, expert_parallel: bool = False, load_universal: bool = False):
    """A DeepSpeed engine around ``model`` as Connito builds one: AdamW (weight decay) and a LambdaLR schedule."""
    import deepspeed

    init_distributed("gloo")  # one process, idempotent

    def optimizer(_params=None):
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "name": "all"}]
        if expert_parallel and stage > 0:  # built after AutoEP's swap: expert parameters in their own groups
            from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

            groups = [g for g in split_params_into_different_moe_groups_for_optimizer(groups) if g["params"]]
        return torch.optim.AdamW(groups, lr=0.01, weight_decay=0.1)

    def scheduler(opt):
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))

    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": 1,
        "zero_optimization": {"stage": stage},
        "steps_per_print": 2**31 - 1,
    }
    if expert_parallel:
        config["expert_parallel"] = get_family("qwen3_moe").autoep.section(1)
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
    client = optimizer if expert_parallel and stage > 0 else optimizer()
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=client, lr_scheduler=scheduler if callable(client) else scheduler(client), config=config
    )
    return engine


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 3))


def train_step(engine, seed: int = 1) -> None:
    torch.manual_seed(seed)
    engine.backward(engine(torch.randn(2, 4)).pow(2).sum())
    engine.step()


def tiny_moe_step(engine) -> None:
    torch.manual_seed(1)
    engine.backward(engine(input_ids=torch.randint(0, 64, (1, 8))).logits.float().pow(2).mean())
    engine.step()


def snapshot(engine) -> dict:
    inner = inner_optimizer(engine)
    params = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    state = [{k: v.clone() for k, v in s.items()} for s in inner.state.values()]
    flat = [p.detach().clone() for g in inner.param_groups for p in g["params"]]
    return {"params": params, "state": state, "flat": flat}


def assert_same_bits(a, b) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same_bits(a[key], b[key])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same_bits(x, y)
    else:
        assert torch.equal(a, b)


# -- the version check ----------------------------------------------------------------------------------------------


def test_an_untested_deepspeed_is_refused_naming_both_versions_and_the_fix(monkeypatch):
    with pytest.raises(DeepSpeedVersionError) as err:
        check_deepspeed_version("0.20.0")
    assert str(err.value) == (
        "Connito relies on private internals of deepspeed==0.19.8 (ZeRO optimizer attributes, checkpoint file "
        "formats: connito.training.deepspeed_internals); installed deepspeed==0.20.0. Install the tested version: "
        "pip install 'deepspeed==0.19.8'"
    )
    check_deepspeed_version()  # the installed one is the tested one
    # setup.py's pin and AutoEP's own check agree with this module's range
    pin = re.search(r'"deepspeed==([^"]+)"', (REPO / "setup.py").read_text()).group(1)
    assert Version(pin) in TESTED_DEEPSPEED and DEEPSPEED_VERSION in TESTED_DEEPSPEED
    # first use of any workaround checks the installed version
    monkeypatch.setattr(ds_internals, "_checked", False)
    monkeypatch.setattr(metadata, "version", lambda name: "0.18.0" if name == "deepspeed" else "0")
    with pytest.raises(DeepSpeedVersionError, match=r"installed deepspeed==0\.18\.0\. Install the tested version"):
        inner_optimizer(None)


# -- the optimizer inside the engine ----------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", [0, 2])
def test_inner_optimizer_is_the_torch_adamw_the_engine_steps(stage):
    engine = build(mlp(), stage)
    inner = inner_optimizer(engine)
    assert type(inner) is torch.optim.AdamW and not offloads_optimizer(engine)
    params = [p for g in inner.param_groups for p in g["params"]]
    if stage == 0:
        assert inner is engine.optimizer and {id(p) for p in params} == {id(p) for p in engine.module.parameters()}
    else:  # ZeRO 2 steps one flat fp32 partition per group
        assert inner is not engine.optimizer and [p.dim() for p in params] == [1]
        assert params[0].numel() >= sum(p.numel() for p in engine.module.parameters())


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_a_skipped_update_leaves_parameters_and_adam_state_bit_identical(stage):
    engine = build(mlp(), stage)
    assert can_skip_update(engine.optimizer)
    train_step(engine, seed=1)  # AdamW state exists
    before = snapshot(engine)
    torch.manual_seed(2)
    engine.backward(engine(torch.randn(2, 4)).pow(2).sum())
    with skipped_update(engine):
        engine.step()
    assert_same_bits(snapshot(engine), before)
    assert engine.skipped_steps == 1
    assert all(p.grad is None or not p.grad.any() for p in engine.module.parameters())  # the gradient was dropped
    train_step(engine, seed=3)  # the patch is gone: the next step updates
    assert not torch.equal(engine.module[0].weight, before["params"]["0.weight"])
    assert engine.skipped_steps == 1


# -- ZeRO-1/2 flat partitions ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_partitions_locate_every_parameter_in_its_flat_fp32_partition(stage):
    engine = build(mlp(), stage)
    train_step(engine)
    (partition,) = zero_partitions(engine.optimizer)
    assert partition.flat is inner_optimizer(engine).param_groups[0]["params"][0]
    by_param = {id(f.param): f for f in partition.fragments}
    for param in engine.module.parameters():  # one rank: every parameter whole in the one partition
        fragment = by_param[id(param)]
        assert (fragment.lp_start, fragment.numel) == (0, param.numel())
        held = partition.flat[fragment.hp_start : fragment.hp_start + fragment.numel]
        assert torch.equal(held, param.detach().reshape(-1))  # the fp32 master is the parameter, element by element
    starts = sorted((f.hp_start, f.numel) for f in partition.fragments)
    assert all(a + n <= b for (a, n), (b, _) in zip(starts, starts[1:]))  # disjoint


# -- DeepSpeed's checkpoint files -------------------------------------------------------------------------------------


def test_zero0_checkpoint_files_read_by_name_module_state_counters_and_optimizer(tmp_path):
    engine = build(mlp(), 0)
    train_step(engine)
    engine.save_checkpoint(str(tmp_path), tag="t", save_latest=False)
    checkpoint = tmp_path / "t"
    assert (checkpoint / MODEL_STATES_FILE).is_file()
    states = read_model_states(checkpoint)
    assert_same_bits(dict(states["module"]), {k: v for k, v in engine.module.state_dict().items()})
    assert autoep_layer_table(states) == []
    saved = engine_state(states)
    assert [saved[k] for k in ENGINE_COUNTERS] == [1, 1, 0] and saved["lr_scheduler"]["last_epoch"] == 1
    assert len(states["optimizer"]["state"]) == 4  # the torch AdamW state, one entry per parameter
    fresh = build(mlp(seed=5), 0)
    set_engine_counters(fresh, {"global_steps": 7, "global_samples": 9, "skipped_steps": 2})
    assert (fresh.global_steps, fresh.global_samples, fresh.skipped_steps) == (7, 9, 2)


def test_autoep_expert_files_and_layer_table_read_by_name(tmp_path):
    engine = build(build_tiny("qwen3_moe").train(), 0, expert_parallel=True)
    tiny_moe_step(engine)
    engine.save_checkpoint(str(tmp_path), tag="t", save_latest=False)
    checkpoint = tmp_path / "t"
    table = autoep_layer_table(read_model_states(checkpoint))
    layers = autoep_layers(engine.module)
    assert [e["module_path"] for e in table] == list(layers) and [e["moe_layer_id"] for e in table] == [0, 1, 2]
    assert {(e["num_experts"], e["ep_size"]) for e in table} == {(8, 1)}
    assert table[0]["expert_placement"]["ranks"] == [{"rank": 0, "experts": list(range(8))}]
    for entry in table:
        layer = layers[entry["module_path"]]
        for expert in (0, 7):
            saved = read_expert_states(checkpoint, entry["moe_layer_id"], expert)
            for w in ("w1", "w2", "w3"):
                assert torch.equal(
                    saved[f"{entry['module_path']}.experts.{w}.{expert}"], getattr(layer.experts, w)[expert]
                )
    optimizer = read_expert_optimizer(checkpoint, 0)
    assert expert_optimizer_file(checkpoint, 0).is_file() and not expert_optimizer_file(checkpoint, 1).exists()
    inner = inner_optimizer(engine)
    assert [len(g["params"]) for g in optimizer["param_groups"]] == [len(g["params"]) for g in inner.param_groups]
    assert set(optimizer["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}


def test_frozen_expert_shards_come_back_from_the_expert_files_after_a_zero2_load(tmp_path):
    model = build_tiny("qwen3_moe").train()
    for name, param in model.named_parameters():
        if name.startswith("model.layers.0.mlp.experts."):  # layer 0 trains no expert: its expert tensors frozen
            param.requires_grad_(False)
    engine = build(model, 2, expert_parallel=True)
    layers = autoep_layers(engine.module)
    frozen, trained = layers["model.layers.0.mlp"].experts, layers["model.layers.1.mlp"].experts
    assert not frozen.w1.requires_grad and trained.w1.requires_grad
    tiny_moe_step(engine)
    engine.save_checkpoint(str(tmp_path), tag="t", save_latest=False)
    expected = {w: getattr(frozen, w).detach().clone() for w in ("w1", "w2", "w3")}
    trained_w1 = trained.w1.detach().clone()
    with torch.no_grad():  # what DeepSpeed's frozen_param_fragments copy does to another ep rank's shards
        for w in ("w1", "w2", "w3"):
            getattr(frozen, w).zero_()
        trained.w1.add_(1.0)
    restore_frozen_expert_shards(engine, tmp_path / "t")
    for w, tensor in expected.items():
        assert torch.equal(getattr(frozen, w), tensor), w
    assert torch.equal(trained.w1, trained_w1 + 1.0)  # trainable shards are the optimizer's to restore: untouched


# -- universal checkpoints --------------------------------------------------------------------------------------------


def test_convert_to_universal_and_the_universal_tensor_files_deepspeed_loads(tmp_path):
    engine = build(mlp(), 2)
    train_step(engine)
    engine.save_checkpoint(str(tmp_path), tag="t", save_latest=False)
    checkpoint, universal = tmp_path / "t", tmp_path / "t" / "universal"
    convert_to_universal(checkpoint, universal)
    assert not (checkpoint / "latest_universal").exists()
    assert (universal / UNIVERSAL_OPTIMIZER_FILE).is_file()
    zero = universal / "zero"
    for name, param in engine.module.named_parameters():
        assert torch.equal(read_universal_state(zero / name, "fp32"), param.detach())
        assert read_universal_state(zero / name, "exp_avg").shape == param.shape
        assert (zero / name / UNIVERSAL_STEP_FILE).is_file()
    assert read_universal_state(zero / "0.weight", "no_such_state") is None
    # a tensor written here is what DeepSpeed's universal loader restores
    doubled = engine.module[0].weight.detach() * 2
    write_universal_state(zero / "0.weight", "fp32", doubled)
    fresh = build(mlp(seed=5), 2, load_universal=True)
    path, _ = fresh.load_checkpoint(str(universal.parent), tag=universal.name)
    assert path is not None and torch.equal(fresh.module[0].weight.detach(), doubled)
    assert torch.equal(fresh.module[1].weight.detach(), engine.module[1].weight.detach())
    write_universal_state(Path(tmp_path / "expert"), "fp32", torch.zeros(4, 2, 3), expert_count=4)
    payload = torch.load(tmp_path / "expert" / "fp32.pt", weights_only=False)
    assert (payload["cat_dim"], payload["is_expert_param"], payload["ep_num_experts"]) == (0, True, 4)


# -- the one place ----------------------------------------------------------------------------------------------------

PRIVATE_ATTRIBUTES = {
    "_hp_mapping",
    "bit16_groups",
    "single_partition_of_fp32_groups",
    "check_overflow",
    "check_grad_overflow",
    "cpu_offload",
}
PRIVATE_FILE_WORDS = ("mp_rank_00", "optim_states", "zero_pp_rank", "ds_autoep_layers", "latest_universal")


def test_no_other_module_of_connito_reaches_these_internals():
    """Code (not docstrings) outside deepspeed_internals names none of DeepSpeed's private attributes or files."""
    offenders = []
    for path in sorted((REPO / "connito").rglob("*.py")):
        if path.name == "deepspeed_internals.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and node.body
            and isinstance(node.body[0], ast.Expr)
            and isinstance(node.body[0].value, ast.Constant)
        }
        for node in ast.walk(tree):
            where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Attribute) and node.attr in PRIVATE_ATTRIBUTES:
                offenders.append(f"{where} .{node.attr}")
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                words = [w for w in PRIVATE_FILE_WORDS if w in node.value]
                words += [node.value] if node.value in PRIVATE_ATTRIBUTES else []  # getattr(x, "name")
                offenders += [f"{where} '{word}'" for word in words]
    assert offenders == []
