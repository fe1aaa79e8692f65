"""FlexOLMo: owner checkpoints from a tiny public dense model (llama, qwen3), 'trained' owners (expert 1 and router
row 1 moved, as callbacks.trainable router_rows trains them), the merge, its refusals, and opting an owner out."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from connito.composition.flexolmo import (
    PROVENANCE_FILE,
    FlexOlmoError,
    merge_owners,
    owner_experts,
    owner_start,
)
from connito.experts import ExpertView
from connito.models.families import ModelError
from connito.models.fingerprint import checkpoint_fingerprint
from connito.routing.opt_out import OptOut, in_every_layer, save_without_experts
from tests.composition.tiny import TINY_DENSE

TINY = {**TINY_DENSE, "initializer_range": 0.1}
OVERRIDES = {"llama": {}, "qwen3": {"tie_word_embeddings": True}}  # as configs/model/*_tiny.yaml: qwen3 ties
FAMILY = {"llama": "mixtral", "qwen3": "qwen3_moe"}
TOKENIZER = {"tokenizer.json": '{"model": {"vocab": {"a": 0, "b": 1}}}\n', "tokenizer_config.json": "{}\n"}
LAYERS = TINY["num_hidden_layers"]


def save_public(root: Path, model_type: str) -> Path:
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **TINY, **OVERRIDES[model_type])
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(root / "public")
    for name, text in TOKENIZER.items():
        (root / "public" / name).write_text(text)
    return root / "public"


def load(path: Path):
    return AutoModelForCausalLM.from_pretrained(path).eval()


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (3, 11), generator=torch.Generator().manual_seed(seed))


def swiglu(x: torch.Tensor, expert: dict[str, torch.Tensor]) -> torch.Tensor:
    gate, up = expert["gate_up_proj"].chunk(2, dim=0)
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), expert["down_proj"])


def train_owner(start: Path, out: Path, seed: int, edit=None) -> Path:
    """What an owner's training run changes: expert 1 and router row 1 of every layer (``edit(model)`` may change
    more, to be refused). Saved with save_pretrained, the start's tokenizer files and provenance copied."""
    model = load(start)
    view = ExpertView(model)
    generator = torch.Generator().manual_seed(seed)
    for layer in view.moe_layers:
        expert = view.read_expert((layer, 1))
        view.write_expert(
            (layer, 1), {k: t + 0.05 * torch.randn(t.shape, generator=generator) for k, t in expert.items()}
        )
        row = view.read_router(layer)[1:]
        view.write_router_rows(layer, [1], row + 0.05 * torch.randn(row.shape, generator=generator))
    if edit is not None:
        edit(model)
    model.save_pretrained(out)
    for name in [*TOKENIZER, PROVENANCE_FILE]:
        shutil.copy2(start / name, out / name)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """``world(model_type)`` -> dict(public, starts, owners, merged) for 2 owners 'code' and 'math'; built once."""
    cache = {}

    def get(model_type: str):
        if model_type not in cache:
            root = tmp_path_factory.mktemp(model_type)
            public = save_public(root, model_type)
            starts = {
                name: owner_start(public, root / f"start-{name}", seed=k + 1) for k, name in enumerate(["code", "math"])
            }
            owners = {
                name: train_owner(start, root / f"owner-{name}", k + 7)
                for k, (name, start) in enumerate(starts.items())
            }
            merged = merge_owners(public, owners, root / "merged")
            cache[model_type] = {"public": public, "starts": starts, "owners": owners, "merged": merged, "root": root}
        return cache[model_type]

    return get


@pytest.mark.parametrize("model_type", sorted(FAMILY))
def test_owner_start_is_the_public_model_with_two_copies_of_its_ffn(world, tmp_path, model_type):
    w = world(model_type)
    public = load(w["public"])
    start = load(w["starts"]["code"])
    view = ExpertView(start)
    assert start.config.model_type == FAMILY[model_type]
    assert (view.num_experts, view.top_k, view.moe_layers) == (2, 2, list(range(LAYERS)))
    x = torch.randn(7, TINY["hidden_size"], generator=torch.Generator().manual_seed(3))
    for layer in view.moe_layers:
        expected = public.model.layers[layer].mlp(x)
        for expert in (0, 1):
            assert torch.equal(swiglu(x, view.read_expert((layer, expert))), expected), (layer, expert)
    shared = {n: p for n, p in start.named_parameters() if ".mlp." not in n}
    assert shared and all(torch.equal(p, public.get_parameter(n)) for n, p in shared.items())
    # Router rows: the public row is the same for every owner, each owner's row its own (seeded).
    other = ExpertView(load(w["starts"]["math"]))
    for layer in view.moe_layers:
        assert torch.equal(view.read_router(layer)[0], other.read_router(layer)[0])
        assert not torch.equal(view.read_router(layer)[1], other.read_router(layer)[1])
    # Both experts hold the public FFN and the top-2 weights sum to 1: the public model's logits, to rounding (the
    # weighted sum w0 * f + w1 * f); with equal router rows w0 = w1 = 0.5 exactly and the logits are bit-identical.
    torch.testing.assert_close(start(ids()).logits, public(ids()).logits, rtol=1e-5, atol=1e-5)
    row = torch.randn(TINY["hidden_size"], generator=torch.Generator().manual_seed(5))
    equal = load(owner_start(w["public"], tmp_path / "equal", router_rows=torch.stack([row, row])))
    assert torch.equal(equal(ids()).logits, public(ids()).logits)
    assert torch.equal(ExpertView(equal).read_router(1), torch.stack([row, row]))
    record = json.loads((w["starts"]["code"] / PROVENANCE_FILE).read_text())
    assert record["role"] == "owner_start"
    assert record["public"] == {
        "path": str(w["public"]),
        "fingerprint": checkpoint_fingerprint(w["public"]),
        "model_type": model_type,
    }
    assert all((w["starts"]["code"] / name).read_text() == text for name, text in TOKENIZER.items())


@pytest.mark.parametrize("model_type", sorted(FAMILY))
def test_the_merge_holds_the_public_ffn_and_each_owner_s_trained_expert_bit_for_bit(world, model_type):
    w = world(model_type)
    public, merged = load(w["public"]), load(w["merged"])
    view = ExpertView(merged)
    assert merged.config.model_type == FAMILY[model_type]
    assert (view.num_experts, view.top_k) == (3, 2)
    x = torch.randn(7, TINY["hidden_size"], generator=torch.Generator().manual_seed(4))
    owners = {name: ExpertView(load(path)) for name, path in w["owners"].items()}
    for layer in view.moe_layers:
        assert torch.equal(swiglu(x, view.read_expert((layer, 0))), public.model.layers[layer].mlp(x))
        rows = [owners["code"].read_router(layer)[0]] + [o.read_router(layer)[1] for o in owners.values()]
        assert torch.equal(view.read_router(layer), torch.stack(rows))
        for expert, owner in enumerate(owners.values(), start=1):
            theirs = owner.read_expert((layer, 1))
            assert torch.equal(swiglu(x, view.read_expert((layer, expert))), swiglu(x, theirs))
            assert all(torch.equal(view.read_expert((layer, expert))[k], t) for k, t in theirs.items())
    assert all(torch.equal(p, public.get_parameter(n)) for n, p in merged.named_parameters() if ".mlp." not in n)
    record = json.loads((w["merged"] / PROVENANCE_FILE).read_text())
    assert record["experts"] == ["public", "code", "math"] and record["role"] == "merged"
    assert record["owners"]["math"]["fingerprint"] == checkpoint_fingerprint(w["owners"]["math"])
    assert owner_experts(w["merged"], ["math", "code"]) == [2, 1] and owner_experts(w["merged"], "code") == [1]
    with pytest.raises(FlexOlmoError, match="has no owner 'law'; its owners: code, math"):
        owner_experts(w["merged"], ["law"])


def test_opting_an_owner_out_equals_the_checkpoint_saved_without_its_expert(world, tmp_path):
    w = world("llama")
    merged = load(w["merged"])
    out = save_without_experts(w["merged"], in_every_layer(*owner_experts(w["merged"], ["code"])), tmp_path / "no-code")
    smaller = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers
    assert ExpertView(smaller).num_experts == 2
    with OptOut(merged, in_every_layer(*owner_experts(w["merged"], ["code"]))):
        opted_out = merged(ids(1)).logits
    assert torch.equal(opted_out, smaller(ids(1)).logits)
    assert not torch.equal(merged(ids(1)).logits, opted_out)  # the owner's expert did take tokens


def tampered(name: str, tensor: str, delta: float = 1e-3, row: int | None = None):
    def edit(model):
        with torch.no_grad():
            param = model.get_parameter(tensor)
            (param if row is None else param[row]).add_(delta)

    return name, edit


REFUSALS = {
    "attention": (tampered("q", "model.layers.1.self_attn.q_proj.weight"),
                  r"owner 'math' .* differs from the public model in 1 shared tensors, first: "
                  r"model\.layers\.1\.self_attn\.q_proj\.weight \(max abs diff 0\.001\)"),
    "public expert": (tampered("e0", "model.layers.0.mlp.experts.down_proj", row=0),
                      r"model\.layers\.0\.mlp\.experts\.down_proj\[0\] \(public expert\)"),
    "public router row": (tampered("r0", "model.layers.1.mlp.gate.weight", row=0),
                          "router row 0 .* not the one owner_start wrote .* router_rows=true"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_an_owner_that_moved_a_shared_tensor_is_refused_naming_it(world, tmp_path, case):
    w = world("llama")
    (label, edit), message = REFUSALS[case]
    bad = train_owner(w["starts"]["math"], tmp_path / label, 8, edit)
    with pytest.raises(FlexOlmoError, match=message):
        merge_owners(w["public"], {"code": w["owners"]["code"], "math": bad}, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_other_refusals_write_nothing(world, tmp_path):
    w = world("llama")
    public, owners, root = w["public"], w["owners"], w["root"]
    qwen3 = world("qwen3")
    # the public row's record is missing (a trained export): the row is compared with the first owner's instead
    no_record = train_owner(
        w["starts"]["math"], tmp_path / "no-record", 8, tampered("r", "model.layers.0.mlp.gate.weight", row=0)[1]
    )
    (no_record / PROVENANCE_FILE).unlink()
    config = tmp_path / "config"
    shutil.copytree(owners["math"], config)
    data = json.loads((config / "config.json").read_text())
    (config / "config.json").write_text(json.dumps({**data, "rms_norm_eps": 1e-5}))
    tokenizer = tmp_path / "tokenizer"
    shutil.copytree(owners["math"], tokenizer)
    (tokenizer / "tokenizer.json").write_text("{}")
    cases = [
        ({"math": no_record}, r"mlp\.gate\.weight\[0\] \(public router row, vs owner 'code'\)"),
        ({"math": qwen3["owners"]["math"]}, r"owner 'math' .* started from another public checkpoint"),
        ({"math": config}, r"another config than owner_start writes \('rms_norm_eps': owner 1e-05, owner_start 1e-06"),
        ({"math": tokenizer}, "tokenizer file 'tokenizer.json' differs from the public one"),
        ({"math": owners["code"]}, "owners 'code' and 'math' are the same directory"),
        ({"math": public}, "owner 'math' is the public checkpoint itself"),
    ]
    for extra, message in cases:
        with pytest.raises(FlexOlmoError, match=message):
            merge_owners(public, {"code": owners["code"], **extra}, tmp_path / "out")
    with pytest.raises(FlexOlmoError, match="at least 1 owner"):
        merge_owners(public, {}, tmp_path / "out")
    with pytest.raises(FlexOlmoError, match="owner 'code' is given twice"):
        merge_owners(public, [("code", owners["code"]), ("code", owners["math"])], tmp_path / "out")
    with pytest.raises(ModelError, match="is inside the public checkpoint"):
        merge_owners(public, owners, public / "out")
    assert not (tmp_path / "out").exists() and not list(root.glob(".out*"))


def test_owner_start_refuses_what_it_cannot_build(world, tmp_path):
    w = world("llama")
    with pytest.raises(FlexOlmoError, match=r"router_rows .* shape \[3, 64\]; expected float \[E, H\] = \[2, 64\]"):
        owner_start(w["public"], tmp_path / "out", router_rows=torch.zeros(3, 64))
    torch.manual_seed(0)
    qwen2 = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen2", **TINY))
    qwen2.save_pretrained(tmp_path / "qwen2")
    with pytest.raises(FlexOlmoError, match="is a qwen2 model; FlexOlmo takes dense llama, qwen3 checkpoints"):
        owner_start(tmp_path / "qwen2", tmp_path / "out")
    with pytest.raises(FlexOlmoError, match="not a merged one"):
        owner_experts(w["starts"]["code"], ["code"])
    assert not (tmp_path / "out").exists()


def test_a_single_owner_merges_into_two_experts_top_2(world, tmp_path):
    w = world("qwen3")
    merged = load(merge_owners(w["public"], {"math": w["owners"]["math"]}, tmp_path / "one", top_k=4))
    view = ExpertView(merged)
    assert (view.num_experts, view.top_k) == (2, 2)
    owner = ExpertView(load(w["owners"]["math"]))
    for layer in view.moe_layers:
        assert torch.equal(view.read_router(layer), owner.read_router(layer))
        assert torch.equal(view.read_expert((layer, 1))["gate_up_proj"], owner.read_expert((layer, 1))["gate_up_proj"])
    # an owner that has not trained merges to the owner's start: the public model, to rounding
    untrained = load(merge_owners(w["public"], {"code": w["starts"]["code"]}, tmp_path / "untrained"))
    torch.testing.assert_close(untrained(ids()).logits, load(w["public"])(ids()).logits, rtol=1e-5, atol=1e-5)
