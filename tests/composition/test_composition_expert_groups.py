"""Expert-group jobs on tiny Qwen3-MoE checkpoints (3 MoE layers x 8 experts): the partition is disjoint and gives
a contested expert to the domain with the larger share (ties to the first listed); the group mask files pass the
job's fingerprint check on their base only; merging disjoint packages gives each group's experts bit for bit and
the base everywhere else; overlaps are refused by default, averaged or first-wins on request; foreign or damaged
packages are refused with nothing written; the loss gate refuses a regression with its numbers. Packages are made
with ``save_delta`` from a copy of the base whose chosen experts are perturbed (no training)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from connito.analysis.expert_scores import SelectionError
from connito.composition.expert_groups import merge
from connito.composition.expert_groups.merge import PROVENANCE_FILE, GroupMergeError, merge_groups
from connito.composition.expert_groups.partition import partition_experts, partition_from_analysis, write_group_masks
from connito.composition.expert_groups.validation import (
    DEFAULT_MAX_REGRESSION,
    held_out_losses,
    held_out_validator,
    validate_merge,
)
from connito.data import prepare_data
from connito.data.config import DataConfig
from connito.experts import ExpertMask, ExpertView
from connito.experts.delta import DeltaError, load_delta, save_delta
from connito.experts.delta.package import expert_tensor_names
from connito.experts.mask_file import read_mask_file
from connito.models import ModelError
from connito.models.fingerprint import checkpoint_fingerprint
from tests.experts.conftest import build_tiny

MOE_LAYERS, NUM_LAYERS = [0, 1, 2], 3
# ESFT-style gate scores (each layer sums to 1), rows follow MOE_LAYERS. With top_p=0.5: code picks (0: 0, 1),
# (1: 3), (2: 0, 1); math picks (0: 1), (1: 3), (2: 4). Contested: (0, 1), where math's share 0.5 beats code's 0.3,
# and (1, 3), a tie at 0.5 that goes to the domain listed first.
CODE = [[0.4, 0.3, 0.2, 0.1, 0, 0, 0, 0], [0, 0, 0, 0.5, 0.5, 0, 0, 0], [0.25] * 4 + [0] * 4]
MATH = [[0.1, 0.5, 0, 0, 0.4, 0, 0, 0], [0, 0, 0, 0.5, 0, 0.3, 0.2, 0], [0, 0, 0, 0, 0.6, 0.4, 0, 0]]
# What each package's job "trained": experts and module tensors of the base, perturbed.
JOBS = {
    "code": ([(0, 0), (1, 3), (2, 0), (2, 1)], []),
    "math": ([(0, 1), (2, 4)], ["model.layers.2.mlp.gate.weight"]),
    "other": ([(1, 3), (0, 5)], ["model.layers.2.mlp.gate.weight"]),  # overlaps code's (1, 3) and math's router
}


def save_base(path: Path, seed: int = 0, **overrides) -> Path:
    build_tiny("qwen3_moe", seed=seed, **overrides).save_pretrained(path)
    if not (path / "tokenizer_config.json").exists():
        (path / "tokenizer_config.json").write_text('{"model_max_length": 64}\n')  # stands for the tokenizer files
    return path


def make_package(base: Path, out: Path, job: str, seed: int, scale: float = 0.05) -> Path:
    """``save_delta`` of the base with ``JOBS[job]``'s experts and modules perturbed."""
    ids, modules = JOBS[job]
    model = AutoModelForCausalLM.from_pretrained(base, local_files_only=True)
    view = ExpertView(model)
    generator = torch.Generator().manual_seed(seed)
    for expert_id in ids:
        tensors = view.read_expert(expert_id)
        view.write_expert(
            expert_id, {k: t + scale * torch.randn(t.shape, generator=generator) for k, t in tensors.items()}
        )
    with torch.no_grad():
        for name in modules:
            tensor = model.state_dict()[name]
            tensor.add_(scale * torch.randn(tensor.shape, generator=generator))
    mask = ExpertMask.from_ids(ids, view.num_layers, view.num_experts, view.moe_layers)
    save_delta(model, base, out, mask, modules)
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """``(base, {job: package})``: one base and one package per job of ``JOBS``."""
    root = tmp_path_factory.mktemp("groups")
    base = save_base(root / "base")
    return base, {job: make_package(base, root / job, job, seed) for seed, job in enumerate(JOBS)}


def load(path: Path):
    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True)


def mask(ids) -> ExpertMask:
    return ExpertMask.from_ids(ids, NUM_LAYERS, 8, MOE_LAYERS)


# -- partition ---------------------------------------------------------------------------------------------------


def test_partition_is_disjoint_and_gives_a_contested_expert_to_the_larger_share():
    scores = {"code": torch.tensor(CODE, dtype=torch.float64), "math": torch.tensor(MATH, dtype=torch.float64)}
    groups = partition_experts(scores, MOE_LAYERS, NUM_LAYERS, top_p=0.5)
    assert groups["code"] == mask([(0, 0), (1, 3), (2, 0), (2, 1)])  # lost (0, 1) to math, won the tie on (1, 3)
    assert groups["math"] == mask([(0, 1), (2, 4)])
    assert not len(groups["code"] & groups["math"])
    swapped = partition_experts({"math": MATH, "code": CODE}, MOE_LAYERS, NUM_LAYERS, top_p=0.5)
    assert swapped["math"] == mask([(0, 1), (1, 3), (2, 4)])  # the tie goes to the first listed domain
    # Shares are compared, not raw scores: scaling one domain's scores changes nothing.
    scaled = {"code": 10 * scores["code"], "math": scores["math"]}
    assert partition_experts(scaled, MOE_LAYERS, NUM_LAYERS, top_p=0.5) == groups
    assert partition_experts(scores, MOE_LAYERS, NUM_LAYERS, top_n=1)["code"] == mask([(0, 0), (1, 3), (2, 0)])

    with pytest.raises(SelectionError, match=r"2 experts are picked by several domains \(\(0, 1\): code, math, "):
        partition_experts(scores, MOE_LAYERS, NUM_LAYERS, top_p=0.5, overlap="refuse")
    with pytest.raises(SelectionError, match=r"domain 'copy' keeps no expert \(each expert it picked went to another"):
        partition_experts({"code": CODE, "copy": CODE}, MOE_LAYERS, NUM_LAYERS, top_p=0.5)
    with pytest.raises(SelectionError, match=r"scores of 'math' must be \[3 MoE layers, experts\]"):
        partition_experts({"code": CODE, "math": MATH[:2]}, MOE_LAYERS, NUM_LAYERS)
    with pytest.raises(SelectionError, match=r"cover the same experts, got experts per layer \{'code': 8, 'math': 7\}"):
        partition_experts({"code": CODE, "math": [row[:7] for row in MATH]}, MOE_LAYERS, NUM_LAYERS)


def test_group_masks_from_an_analysis_pass_the_jobs_check_on_their_base_only(checkpoints, tmp_path):
    base, _ = checkpoints
    analysis = {
        "schema": "connito.analysis/1",
        "model": {"path": str(base), "fingerprint": checkpoint_fingerprint(base), "model_type": "qwen3_moe",
                  "num_layers": NUM_LAYERS, "moe_layers": MOE_LAYERS, "num_experts": 8, "top_k": 2},
        "data": {"split": "validation", "domains": ["code", "math"], "tokens": {"code": 900, "math": 700},
                 "usable": {"code": True, "math": True}},
        "esft": {"gate_score": {"code": CODE, "math": MATH}, "selection_ratio": {"code": MATH, "math": CODE}},
    }  # fmt: skip
    (tmp_path / "analysis.json").write_text(json.dumps(analysis))
    groups = partition_from_analysis(tmp_path, ["code", "math"], top_p=0.5)
    assert groups == partition_experts({"code": CODE, "math": MATH}, MOE_LAYERS, NUM_LAYERS, top_p=0.5)
    by_token = partition_from_analysis(tmp_path, ["code", "math"], 0.5, score="token")  # the tables swapped
    assert by_token["code"] == mask([(0, 1), (1, 3), (2, 4)])  # wins (0, 1) by share, (1, 3) by order

    paths = write_group_masks(groups, base, tmp_path / "masks", analysis=tmp_path, selection={"top_p": 0.5})
    assert paths == {d: tmp_path / "masks" / f"{d}.mask.json" for d in ("code", "math")}
    for domain, path in paths.items():
        read = read_mask_file(path, base)  # what callbacks.trainable checks against model.path
        assert read.mask == groups[domain] and read.selection["top_p"] == 0.5
        assert read.selection["source"] == str((tmp_path / "analysis.json").resolve())
    other = save_base(tmp_path / "other", seed=1)
    with pytest.raises(ModelError, match="was made for another model"):
        read_mask_file(paths["code"], other)
    with pytest.raises(ModelError, match=r"analysis .* was computed on another model"):
        write_group_masks(groups, other, tmp_path / "masks2", analysis=tmp_path)
    with pytest.raises(SelectionError, match=r"groups 'code' and 'copy' share experts \[\(0, 0\), \(1, 3\)"):
        write_group_masks({"code": groups["code"], "copy": groups["code"]}, base, tmp_path / "masks2")
    assert not (tmp_path / "masks2").exists()


# -- merge -------------------------------------------------------------------------------------------------------


def test_disjoint_groups_merge_bit_exactly_onto_the_base(checkpoints, tmp_path):
    base, packages = checkpoints
    result = merge_groups(base, {"code": packages["code"], "math": packages["math"]}, tmp_path / "merged")
    merged, base_model = load(result.out), load(base)
    view, base_view = ExpertView(merged), ExpertView(base_model)
    carried = {}
    for job in ("code", "math"):
        delta = load_delta(packages[job])
        assert result.groups[job] == delta.manifest.experts
        carried.update(delta.experts)
    for layer in MOE_LAYERS:
        for expert in range(8):
            want = carried.get((layer, expert)) or base_view.read_expert((layer, expert))
            got = view.read_expert((layer, expert))
            assert all(torch.equal(got[k], want[k]) for k in want), (layer, expert)
    router = load_delta(packages["math"]).modules["model.layers.2.mlp.gate.weight"]
    stacked = expert_tensor_names(merged, view)
    base_state = base_model.state_dict()
    for name, tensor in merged.state_dict().items():
        if name not in stacked:
            assert torch.equal(tensor, router if name == "model.layers.2.mlp.gate.weight" else base_state[name]), name

    record = json.loads((result.out / PROVENANCE_FILE).read_text())
    assert record["base"]["fingerprint"] == checkpoint_fingerprint(base) == result.base_fingerprint
    assert record["overlap"] == "refuse" and record["overlaps"] == {"experts": [], "modules": []}
    assert record["packages"]["math"]["modules"] == ["model.layers.2.mlp.gate.weight"]
    assert record["packages"]["code"]["experts"] == [[0, 0], [1, 3], [2, 0], [2, 1]]
    assert record["packages"]["code"]["manifest_sha256"].startswith("sha256:") and record["validation"] is None
    assert (result.out / "tokenizer_config.json").read_text() == (base / "tokenizer_config.json").read_text()


def test_overlapping_packages_are_refused_naming_both_or_averaged_or_first_wins(checkpoints, tmp_path):
    base, packages = checkpoints
    with pytest.raises(GroupMergeError) as refused:
        merge_groups(base, packages, tmp_path / "refused")
    message = str(refused.value)
    assert "'code' and 'other' both change experts (1, 3)" in message
    assert "'math' and 'other' both change modules ['model.layers.2.mlp.gate.weight']" in message
    assert not (tmp_path / "refused").exists()

    deltas = {job: load_delta(path) for job, path in packages.items()}
    router = "model.layers.2.mlp.gate.weight"
    for policy in ("average", "first"):
        result = merge_groups(base, packages, tmp_path / policy, overlap=policy)
        merged = load(result.out)
        got = ExpertView(merged).read_expert((1, 3))
        code, other = deltas["code"].experts[(1, 3)], deltas["other"].experts[(1, 3)]
        math_router, other_router = deltas["math"].modules[router], deltas["other"].modules[router]
        if policy == "average":
            assert all(torch.equal(got[k], (code[k] + other[k]) / 2) for k in got)
            assert torch.equal(merged.state_dict()[router], (math_router + other_router) / 2)
        else:
            assert all(torch.equal(got[k], code[k]) for k in got)
            assert torch.equal(merged.state_dict()[router], math_router)
        alone = ExpertView(merged).read_expert((0, 5))  # other's own expert is other's either way
        assert all(torch.equal(alone[k], t) for k, t in deltas["other"].experts[(0, 5)].items())
        assert result.overlaps == {
            "experts": [{"expert": [1, 3], "packages": ["code", "other"]}],
            "modules": [{"module": router, "packages": ["math", "other"]}],
        }

    # A package that carries an expert bit-identical to the base's does not change it: no overlap, not written.
    base_model = load(base)
    save_delta(base_model, base, tmp_path / "idle", mask([(1, 3)]), [router])
    result = merge_groups(base, {"code": packages["code"], "idle": tmp_path / "idle"}, tmp_path / "idle-merged")
    assert result.overlaps == {"experts": [], "modules": []} and not len(result.groups["idle"])
    assert result.record["packages"]["idle"]["carried_unchanged"] == {"experts": [[1, 3]], "modules": [router]}
    got = ExpertView(load(result.out)).read_expert((1, 3))
    assert all(torch.equal(got[k], t) for k, t in deltas["code"].experts[(1, 3)].items())


def test_a_foreign_package_is_refused_naming_it_and_both_fingerprints(checkpoints, tmp_path):
    base, packages = checkpoints
    other = save_base(tmp_path / "other", seed=1)
    foreign = make_package(other, tmp_path / "foreign", "math", seed=5)
    ours, theirs = checkpoint_fingerprint(base)[:19], checkpoint_fingerprint(other)[:19]
    with pytest.raises(GroupMergeError, match=rf"foreign group: package 'math' .*{theirs}.*{ours}"):
        merge_groups(base, {"code": packages["code"], "math": foreign}, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_tampered_package_is_refused_before_the_base_is_loaded_or_anything_written(
    checkpoints, tmp_path, monkeypatch
):
    base, packages = checkpoints
    tampered = shutil.copytree(packages["code"], tmp_path / "tampered")
    target = tampered / "experts-layer001.safetensors"
    data = bytearray(target.read_bytes())
    data[-5] ^= 0x01
    target.write_bytes(bytes(data))

    class NoModel:
        @staticmethod
        def from_pretrained(*args, **kwargs):
            raise AssertionError("the base was loaded before every package was verified")

    monkeypatch.setattr(merge, "AutoModelForCausalLM", NoModel)
    with pytest.raises(DeltaError, match=r"'experts-layer001.safetensors' has sha256 .* the manifest says"):
        merge_groups(base, {"math": packages["math"], "code": tampered}, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tampered"]  # no staging directory left either


# -- validation --------------------------------------------------------------------------------------------------


def test_validate_merge_refuses_a_regression_with_its_numbers_and_accepts_within_the_threshold():
    base = {"code": 2.0, "math": 3.0}
    with pytest.raises(GroupMergeError, match="rose more than allowed on math") as refused:
        validate_merge(base, {"code": 1.9, "math": 3.05})
    assert "| math | 3.0000 | 3.0500 | +0.0500 | +0.0200 | REFUSED |" in str(refused.value)
    assert "| code | 2.0000 | 1.9000 | -0.1000 | +0.0200 | ok |" in str(refused.value)
    assert validate_merge(base, {"code": 1.9, "math": 3.015}) is None
    assert validate_merge(base, {"code": 2.0, "math": 3.05}, {"code": 0.0, "math": 0.1}) is None
    with pytest.raises(GroupMergeError, match=r"REFUSED"):
        validate_merge(base, {"code": float("nan"), "math": 3.0})
    with pytest.raises(GroupMergeError, match=r"max_regression for 'math' is None"):
        validate_merge(base, {"code": 2.0, "math": 3.0}, {"code": 0.1})


def test_a_refused_validation_leaves_no_checkpoint_and_an_accepted_one_is_recorded(checkpoints, tmp_path):
    base, packages = checkpoints
    groups = {"code": packages["code"], "math": packages["math"]}
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "old.txt").write_text("previous merge")

    def refuse(stage: Path):
        assert load(stage) is not None and (stage / "tokenizer_config.json").is_file()  # a complete checkpoint
        validate_merge({"code": 2.0}, {"code": 2.5})

    with pytest.raises(GroupMergeError, match=r"\| code \| 2.0000 \| 2.5000 \| \+0.5000 \| \+0.0200 \| REFUSED \|"):
        merge_groups(base, groups, tmp_path / "kept", overwrite=True, validate=refuse)
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]

    result = merge_groups(base, groups, tmp_path / "kept", overwrite=True, validate=lambda stage: {"seen": stage.name})
    assert result.validation["seen"].startswith(".kept.partial-")
    assert json.loads((tmp_path / "kept" / PROVENANCE_FILE).read_text())["validation"] == result.validation


def test_held_out_validator_measures_base_and_merge_on_the_same_rows(tmp_path):
    words = {"alpha": "the cat sat on a mat with hat and bat", "beta": "def return import class lambda yield for"}
    generator = torch.Generator().manual_seed(0)
    for domain, text in words.items():
        vocab = text.split()
        docs = [" ".join(vocab[i] for i in torch.randint(len(vocab), (30,), generator=generator)) for _ in range(40)]
        (tmp_path / f"{domain}.txt").write_text("\n\n".join(docs))
    files = [str(tmp_path / f"{d}.txt") for d in words]
    data = DataConfig(cache_dir=str(tmp_path / "cache"), source="files", files=files, domain_column=None)
    data.vocab_size, data.seq_len = 300, 32
    tokenizer = prepare_data(data, progress=False).load_tokenizer()
    base = save_base(tmp_path / "base", vocab_size=300)
    tokenizer.save_pretrained(base)
    sharp = load(base)  # a "job" that makes every prediction overconfident: the held-out loss must rise
    with torch.no_grad():
        sharp.lm_head.weight.mul_(2.0)
    save_delta(sharp, base, tmp_path / "sharp", ExpertView(sharp).empty_mask(), ["lm_head.weight"])
    packages = {"code": make_package(base, tmp_path / "code", "code", seed=0), "sharp": tmp_path / "sharp"}
    domains = ["alpha", "beta"]
    validate = held_out_validator(base, data, domains, max_regression=1000.0)
    result = merge_groups(base, packages, tmp_path / "ok", validate=validate)
    record = result.validation
    assert record["base"] == held_out_losses(base, data, domains) and record["merged"] == held_out_losses(
        result.out, data, domains, tokenizer_dir=base
    )
    assert record["merged"] != record["base"]
    risen = {d: record["merged"][d] - record["base"][d] for d in domains}
    worst = max(risen, key=risen.get)
    assert risen[worst] > DEFAULT_MAX_REGRESSION  # the sharpened lm_head
    with pytest.raises(GroupMergeError, match=rf"rose more than allowed on {worst}"):
        merge_groups(base, packages, tmp_path / "no", validate=held_out_validator(base, data, domains))
    assert not (tmp_path / "no").exists()
