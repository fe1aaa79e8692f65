"""Expert delta packages on tiny transformers models: base + delta reproduces the trained model's logits exactly,
frozen weights stay bit-identical in the written checkpoint, and damaged or foreign deltas are refused with nothing
written."""

import fnmatch
import hashlib
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from connito.cli.main import main
from connito.experts import ExpertMask, ExpertView
from connito.experts.delta import (
    SCHEMA,
    DeltaError,
    apply_delta,
    changed_experts,
    changed_modules,
    load_delta,
    save_delta,
)
from connito.models import ModelError
from connito.models.fingerprint import checkpoint_fingerprint

TRAINED = {  # experts and module globs an adaptation run trains, per family
    "qwen3_moe": ([(1, 2), (1, 5), (2, 7)], ["model.layers.1.mlp.gate.weight"]),
    "mixtral": ([(0, 3), (2, 0)], ["model.layers.2.mlp.gate.weight"]),
    "deepseek_v3": (  # dense layer 0; shared experts and the choice bias are modules
        [(1, 1), (2, 6)],
        ["model.layers.2.mlp.gate.*", "model.layers.1.mlp.shared_experts.*"],
    ),
}
INPUT_IDS = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))


def save_base(builder, model_type: str, path: Path, **overrides) -> Path:
    builder(model_type, **overrides).save_pretrained(path)
    (path / "tokenizer_config.json").write_text('{"model_max_length": 64}\n')  # stands for the tokenizer files
    return path


def train(base: Path, model_type: str):
    """The base with some experts and modules changed, as an adaptation run leaves it; and the mask + globs."""
    ids, patterns = TRAINED[model_type]
    model = AutoModelForCausalLM.from_pretrained(base, local_files_only=True).eval()
    view = ExpertView(model)
    generator = torch.Generator().manual_seed(1)
    for expert_id in ids:
        tensors = view.read_expert(expert_id)
        noise = {kind: 0.05 * torch.randn(t.shape, generator=generator) for kind, t in tensors.items()}
        view.write_expert(expert_id, {kind: t + noise[kind] for kind, t in tensors.items()})
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if selected(name, patterns):
                tensor.add_(0.05 * torch.randn(tensor.shape, generator=generator))
    return model, mask_of(view, ids), patterns


def mask_of(view: ExpertView, ids) -> ExpertMask:
    return ExpertMask.from_ids(ids, view.num_layers, view.num_experts, view.moe_layers)


def selected(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def digests(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}


def safetensors_of(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(path / "model.safetensors", "pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - safe_open has no __iter__


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits


@pytest.fixture
def package(tmp_path, tiny_builder, request):
    """``(base dir, trained model, mask, module globs, delta dir)`` of qwen3_moe (or the parametrized family)."""
    model_type = getattr(request, "param", "qwen3_moe")
    base = save_base(tiny_builder, model_type, tmp_path / "base")
    trained, mask, patterns = train(base, model_type)
    save_delta(trained, base, tmp_path / "delta", mask, patterns)
    return base, trained, mask, patterns, tmp_path / "delta"


@pytest.mark.parametrize("package", sorted(TRAINED), indirect=True)
def test_base_plus_delta_reproduces_the_trained_model_and_leaves_the_rest_bit_identical(package, tmp_path):
    base, trained, mask, patterns, delta_dir = package
    base_model = AutoModelForCausalLM.from_pretrained(base, local_files_only=True).eval()
    assert changed_experts(trained, base_model) == mask  # the premise: exactly these experts were trained
    module_names = changed_modules(trained, base_model)
    assert module_names and all(selected(name, patterns) for name in module_names)

    manifest = json.loads((delta_dir / "manifest.json").read_text())
    assert manifest["schema"] == SCHEMA and manifest["base"]["fingerprint"] == checkpoint_fingerprint(base)
    assert manifest["modules"] == module_names and manifest["dtype"] == "float32"
    for name, info in manifest["files"].items():
        assert info["sha256"] == "sha256:" + hashlib.sha256((delta_dir / name).read_bytes()).hexdigest()
    delta = load_delta(delta_dir)
    assert delta.manifest.experts == mask and set(delta.experts) == set(mask.ids())
    view = ExpertView(trained)
    for expert_id, tensors in delta.experts.items():  # one tensor per (layer, expert) and kind, in the HF form
        assert set(tensors) == {"gate_up_proj", "down_proj"}
        assert all(torch.equal(t, view.read_expert(expert_id)[k]) for k, t in tensors.items())
    delta_bytes = sum(info["bytes"] for info in manifest["files"].values())
    assert delta_bytes < (base / "model.safetensors").stat().st_size / 3, "a delta carries only what was trained"

    before = digests(base)
    out = apply_delta(base, delta_dir, tmp_path / "out")
    assert digests(base) == before, "the base checkpoint is never written to"
    applied = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert torch.equal(logits(applied), logits(trained))
    assert not torch.equal(logits(base_model), logits(trained))
    assert (out / "tokenizer_config.json").read_text() == (base / "tokenizer_config.json").read_text()

    # Read straight from the written safetensors (the family's on-disk names): what the delta did not carry is the
    # base's bytes; what it carried is the trained model's.
    written, original = safetensors_of(out), safetensors_of(base)
    assert set(written) == set(original)
    carried = [re.compile(rf"model\.layers\.{lay}\.[a-z_]+\.experts\.{exp}\.") for lay, exp in mask.ids()]
    differ = {key for key in written if not torch.equal(written[key], original[key])}
    expert_keys = {key for key in written if any(c.match(key) for c in carried)}
    live_name = {key: key.replace(".block_sparse_moe.", ".mlp.") for key in original}  # Mixtral's on-disk name
    module_keys = {key for key in original if selected(live_name[key], patterns)}
    assert expert_keys and differ == expert_keys | module_keys
    assert len(expert_keys) == 3 * len(mask)  # gate, up and down of each carried expert


def test_a_tampered_file_is_refused_by_name_and_nothing_is_written(package, tmp_path):
    base, _, _, _, delta_dir = package
    target = delta_dir / "experts-layer001.safetensors"
    data = bytearray(target.read_bytes())
    data[-5] ^= 0x01  # one bit of one weight
    target.write_bytes(bytes(data))
    with pytest.raises(DeltaError, match=r"'experts-layer001.safetensors' has sha256 .* the manifest says"):
        apply_delta(base, delta_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()

    target.unlink()
    with pytest.raises(DeltaError, match="is missing 'experts-layer001.safetensors'"):
        load_delta(delta_dir)
    (delta_dir / "manifest.json").write_text('{"schema": "connito.delta/9"}')
    with pytest.raises(DeltaError, match="has schema 'connito.delta/9'; this Connito reads 'connito.delta/1'"):
        load_delta(delta_dir)


def test_loading_never_unpickles(package, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a delta was unpickled")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr("pickle.load", refuse)
    monkeypatch.setattr("pickle.loads", refuse)
    delta = load_delta(package[-1])
    assert len(delta.experts) == 3
    assert {p.suffix for p in package[-1].iterdir()} == {".json", ".safetensors"}


LAYER1 = "experts-layer001.safetensors"  # experts (1, 2) and (1, 5) of the qwen3_moe package


def edit_manifest(delta_dir: Path, edit) -> None:
    manifest = json.loads((delta_dir / "manifest.json").read_text())
    edit(manifest)
    (delta_dir / "manifest.json").write_text(json.dumps(manifest))


def rewrite_layer1(delta_dir: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Replace the layer-1 file and give the manifest its new sha256: a package consistent in every other way."""
    save_file(tensors, delta_dir / LAYER1)
    digest = "sha256:" + hashlib.sha256((delta_dir / LAYER1).read_bytes()).hexdigest()
    edit_manifest(delta_dir, lambda m: m["files"][LAYER1].update(sha256=digest))


@pytest.fixture
def no_tensor_read(monkeypatch):
    """load_delta reads no tensor: each refusal below must come before that."""

    def refuse(*args, **kwargs):
        raise AssertionError("a tensor was read before the package was refused")

    monkeypatch.setattr("connito.experts.delta.package.load_file", refuse)


@pytest.mark.parametrize("outside", ["../stolen.safetensors", "absolute"])
def test_a_manifest_naming_a_file_outside_the_package_is_refused(package, tmp_path, no_tensor_read, outside):
    delta_dir = package[-1]
    stolen = tmp_path / "stolen.safetensors"  # a real file with the sha256 the manifest will give it, outside
    stolen.write_bytes((delta_dir / LAYER1).read_bytes())
    name = str(stolen) if outside == "absolute" else outside
    assert (delta_dir / name).resolve() == stolen

    def point_tensors_at(m, file):
        for entry in m["tensors"].values():
            entry["file"] = file if entry["file"] == LAYER1 else entry["file"]

    # Only the tensors' file: the manifest's file list does not hold it.
    edit_manifest(delta_dir, lambda m: point_tensors_at(m, name))
    with pytest.raises(DeltaError, match=rf"tensor 'experts.1.2.down_proj' is in '{re.escape(name)}', which 'files'"):
        load_delta(delta_dir)
    # The file list too, and the file inside gone: the name itself is refused.
    edit_manifest(delta_dir, lambda m: m["files"].update({name: m["files"].pop(LAYER1)}))
    (delta_dir / LAYER1).unlink()
    message = rf"file '{re.escape(name)}' is not a plain \*.safetensors name inside the package \(no folder, no '..'"
    with pytest.raises(DeltaError, match=message):
        load_delta(delta_dir)


@pytest.mark.parametrize("extra", ["extra.safetensors", "weights.bin", "nested"])
def test_a_file_the_manifest_does_not_list_is_refused(package, no_tensor_read, extra):
    delta_dir = package[-1]
    if extra == "nested":
        (delta_dir / extra).mkdir()
        (delta_dir / extra / LAYER1).write_bytes((delta_dir / LAYER1).read_bytes())
    elif extra == "weights.bin":
        torch.save({"experts.1.2.down_proj": torch.zeros(2)}, delta_dir / extra)  # a pickle
    else:
        (delta_dir / extra).write_bytes((delta_dir / LAYER1).read_bytes())
    with pytest.raises(DeltaError, match=rf"holds \['{extra}'\], which its manifest does not list .* remove them"):
        load_delta(delta_dir)


def test_a_tensor_the_manifest_does_not_list_is_refused(package, no_tensor_read):
    delta_dir = package[-1]
    original = load_file(delta_dir / LAYER1)

    # A stowaway tensor in a listed file (the file's sha256 in the manifest matches).
    rewrite_layer1(delta_dir, {**original, "stowaway": torch.zeros(3)})
    with pytest.raises(DeltaError, match=rf"'{LAYER1}' holds tensors \['stowaway'\] that its manifest does not list"):
        load_delta(delta_dir)
    # A tensor the manifest lists missing from its file.
    rewrite_layer1(delta_dir, {k: t for k, t in original.items() if k != "experts.1.5.down_proj"})
    with pytest.raises(DeltaError, match=r"lacks tensors \['experts.1.5.down_proj'\] that its manifest lists"):
        load_delta(delta_dir)

    # The manifest itself lists a tensor it carries for nobody (no expert in its mask, no listed module), in a file
    # that holds it: refused with the manifest, before any file is opened.
    rewrite_layer1(delta_dir, {**original, "stowaway": torch.zeros(3)})
    for key, message in [
        ("experts.1.3.down_proj", r"tensor 'experts.1.3.down_proj' belongs to expert \(1, 3\), not in 'experts'"),
        ("stowaway", "tensor 'stowaway' is neither a carried expert's nor a listed module's"),
    ]:
        manifest = json.loads((delta_dir / "manifest.json").read_text())
        manifest["tensors"][key] = {"file": LAYER1, "shape": [3], "dtype": "float32"}
        (delta_dir / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(DeltaError, match=message):
            load_delta(delta_dir)
        del manifest["tensors"][key]
        (delta_dir / "manifest.json").write_text(json.dumps(manifest))


def test_a_delta_for_another_model_is_refused(package, tmp_path, tiny_builder):
    _, trained, _, _, delta_dir = package
    other = save_base(tiny_builder, "qwen3_moe", tmp_path / "other", seed=1)  # same shapes, other weights
    with pytest.raises(ModelError, match=r"was computed on another model .* allow_other_base=true"):
        apply_delta(other, delta_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    out = apply_delta(other, delta_dir, tmp_path / "out", allow_other_base=True)  # put the experts in anyway
    got = ExpertView(AutoModelForCausalLM.from_pretrained(out, local_files_only=True))
    assert torch.equal(got.read_expert((1, 5))["down_proj"], ExpertView(trained).read_expert((1, 5))["down_proj"])

    wider = save_base(tiny_builder, "qwen3_moe", tmp_path / "wider", moe_intermediate_size=16)
    with pytest.raises(DeltaError, match=r"another config .*\(moe_intermediate_size: delta's base 32, this base 16"):
        apply_delta(wider, delta_dir, tmp_path / "out2")
    with pytest.raises(DeltaError, match=r"expert \(1, 2\) 'down_proj' is float32 \[64, 32\] in the delta, float32 "):
        apply_delta(wider, delta_dir, tmp_path / "out2", allow_other_base=True)
    mixtral = save_base(tiny_builder, "mixtral", tmp_path / "mixtral")
    with pytest.raises(DeltaError, match="is for a qwen3_moe model, base=.* is a mixtral"):
        apply_delta(mixtral, delta_dir, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


def test_outputs_that_could_touch_an_input_are_refused(package, tmp_path):
    base, _, _, _, delta_dir = package
    before = digests(base)
    for out, message in [
        (base, "is the base checkpoint"),
        (base / "merged", "is inside the base checkpoint"),
        (tmp_path, "holds the base checkpoint"),
        (delta_dir / "x", "is inside the delta"),
    ]:
        with pytest.raises(ModelError, match=message):
            apply_delta(base, delta_dir, out, overwrite=True)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(ModelError, match="exists and is not empty.*overwrite=true"):
        apply_delta(base, delta_dir, tmp_path / "busy")
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"
    apply_delta(base, delta_dir, tmp_path / "busy", overwrite=True)
    assert not (tmp_path / "busy" / "keep.txt").exists() and (tmp_path / "busy" / "model.safetensors").is_file()
    assert digests(base) == before


def test_a_failure_while_writing_leaves_no_half_checkpoint(package, tmp_path, monkeypatch):
    base, _, _, _, delta_dir = package

    def fail_halfway(self, directory, **kwargs):
        (Path(directory) / "config.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr("transformers.PreTrainedModel.save_pretrained", fail_halfway)
    with pytest.raises(OSError, match="disk full"):
        apply_delta(base, delta_dir, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "delta"]


def test_an_explicit_dtype_casts_base_and_delta(package, tmp_path):
    base, trained, _, _, delta_dir = package
    out = apply_delta(base, delta_dir, tmp_path / "out", dtype="bfloat16")
    applied = AutoModelForCausalLM.from_pretrained(out, local_files_only=True, dtype="auto")
    assert applied.dtype == torch.bfloat16
    expected = {k: t.to(torch.bfloat16) for k, t in trained.state_dict().items()}
    assert all(torch.equal(t, expected[k]) for k, t in applied.state_dict().items())


def test_save_delta_refuses_what_it_cannot_carry(tmp_path, tiny_builder):
    base = save_base(tiny_builder, "qwen3_moe", tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(base, local_files_only=True)
    view = ExpertView(model)
    mask = mask_of(view, [(1, 1)])
    with pytest.raises(ModelError, match="'model.layers.*.router.weight' matches no tensor"):
        save_delta(model, base, tmp_path / "d", mask, ["model.layers.*.router.weight"])
    with pytest.raises(ModelError, match="matches routed expert tensors .* carry routed experts with the experts mask"):
        save_delta(model, base, tmp_path / "d", mask, ["model.layers.1.mlp.*"])
    with pytest.raises(ModelError, match="no experts and no modules"):
        save_delta(model, base, tmp_path / "d", view.empty_mask())
    with pytest.raises(ModelError, match="is inside the base checkpoint"):
        save_delta(model, base, base / "delta", mask)
    mixtral = save_base(tiny_builder, "mixtral", tmp_path / "mixtral")
    with pytest.raises(ModelError, match="the model is a qwen3_moe, the base checkpoint .* a mixtral"):
        save_delta(model, mixtral, tmp_path / "d", mask)
    assert not (tmp_path / "d").exists()


def test_connito_apply_end_to_end(package, tmp_path, monkeypatch, capsys):
    base, trained, _, _, delta_dir = package
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    main(["apply", f"base={base}", f"delta={delta_dir}", "out=merged"])
    assert f"checkpoint: {tmp_path / 'merged'}" in capsys.readouterr().out
    applied = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", local_files_only=True).eval()
    assert torch.equal(logits(applied), logits(trained))
    provenance = json.loads((tmp_path / "merged" / "connito_delta.json").read_text())
    assert provenance["base"]["fingerprint"] == checkpoint_fingerprint(base)
