"""Branch-Train-MiX merge: tiny dense seeds (llama, qwen3, qwen2) and 3 perturbed branches -> MoE checkpoints."""

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from connito.composition.btx_merge import PROVENANCE_FILE, merge_branches
from connito.experts import ExpertView
from connito.models.families import ModelError
from connito.models.fingerprint import checkpoint_fingerprint
from tests.composition.tiny import TINY_DENSE

TINY = {**TINY_DENSE, "initializer_range": 0.1}
OVERRIDES = {"llama": {}, "qwen3": {"tie_word_embeddings": True}, "qwen2": {}}
FAMILY = {"llama": "mixtral", "qwen3": "qwen3_moe", "qwen2": "qwen2_moe"}
TOKENIZER = {"tokenizer.json": '{"model": {"vocab": {"a": 0, "b": 1}}}\n', "tokenizer_config.json": "{}\n"}
FFN = ("gate_proj", "up_proj", "down_proj")


def save_dense(model, path: Path, tokenizer: dict[str, str] = TOKENIZER) -> Path:
    model.save_pretrained(path)
    for name, text in tokenizer.items():
        (path / name).write_text(text)
    return path


def perturbed(model, seed: int):
    """A copy of ``model`` with every parameter moved by its own noise (a 'trained' branch)."""
    branch = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in branch.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return branch


def dense_model(model_type: str, **overrides):
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **{**TINY, **OVERRIDES[model_type], **overrides})
    return AutoModelForCausalLM.from_config(config).eval()


def make_set(
    root: Path, model_type: str, copies: bool = False, dtype: torch.dtype = torch.float32, **overrides
) -> tuple[Path, list[Path]]:
    """A seed checkpoint and 3 branches (perturbed copies, or exact copies) under ``root``."""
    seed_model = dense_model(model_type, **overrides)
    seed = save_dense(seed_model.to(dtype), root / "seed")
    branches = [
        save_dense((seed_model if copies else perturbed(seed_model, k + 1)).to(dtype), root / f"b{k}") for k in range(3)
    ]
    return seed, branches


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    """``merged(model_type, **merge_options)`` -> (seed, branches, out); each combination built once."""
    cache = {}

    def get(model_type: str, **options):
        key = (model_type, tuple(sorted(options.items())))
        if key not in cache:
            root = tmp_path_factory.mktemp(model_type)
            seed, branches = make_set(root, model_type)
            cache[key] = (seed, branches, merge_branches(seed, branches, root / "out", **options))
        return cache[key]

    return get


def load(path: Path):
    return AutoModelForCausalLM.from_pretrained(path).eval()


def swiglu(x: torch.Tensor, expert: dict[str, torch.Tensor]) -> torch.Tensor:
    gate, up = expert["gate_up_proj"].chunk(2, dim=0)
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), expert["down_proj"])


def outside(out: Path) -> set[str]:
    """Everything beside ``out`` in its folder (a refusal must leave no staging directory behind)."""
    return {p.name for p in out.parent.iterdir()} if out.parent.exists() else set()


@pytest.mark.parametrize("model_type", sorted(FAMILY))
def test_each_expert_is_its_branch_ffn(merged, model_type):
    seed, branches, out = merged(model_type)
    model = load(out)
    assert model.config.model_type == FAMILY[model_type]
    view = ExpertView(model)
    assert (view.num_experts, view.top_k, view.moe_layers) == (3, 2, [0, 1])
    assert model.config.router_aux_loss_coef == 0.01
    assert getattr(model.config, "norm_topk_prob", True) is True
    x = torch.randn(7, TINY["hidden_size"], generator=torch.Generator().manual_seed(3))
    for i, path in enumerate(branches):
        branch = load(path)
        for layer in view.moe_layers:
            expected = branch.model.layers[layer].mlp(x)
            assert torch.equal(swiglu(x, view.read_expert((layer, i))), expected), (layer, i)
        if i:
            assert not torch.equal(swiglu(x, view.read_expert((0, i))), swiglu(x, view.read_expert((0, 0))))


@pytest.mark.parametrize("model_type", sorted(FAMILY))
def test_shared_tensors_are_the_exact_branch_mean(merged, model_type):
    seed, branches, out = merged(model_type)
    merged_state = load_file(out / "model.safetensors")
    seed_state = load_file(seed / "model.safetensors")
    branch_states = [load_file(b / "model.safetensors") for b in branches]
    shared = [n for n in seed_state if ".mlp." not in n]
    assert "model.embed_tokens.weight" in shared and "model.layers.1.self_attn.q_proj.weight" in shared
    assert ("lm_head.weight" in shared) is (model_type != "qwen3")  # qwen3 seeds tie their embeddings
    for name in shared:
        a, b, c = (s[name] for s in branch_states)
        expected = ((a.float() + b.float() + c.float()) / 3).to(a.dtype)
        assert torch.equal(merged_state[name], expected), name
        assert not torch.equal(expected, seed_state[name]), name


def test_bfloat16_branches_merge_in_bfloat16(tmp_path):
    seed, branches = make_set(tmp_path, "llama", dtype=torch.bfloat16)
    out = merge_branches(seed, branches, tmp_path / "out")
    merged_state = load_file(out / "model.safetensors")
    branch_states = [load_file(b / "model.safetensors") for b in branches]
    assert {t.dtype for t in merged_state.values()} == {torch.bfloat16}
    a, b, c = (s["model.layers.0.self_attn.q_proj.weight"] for s in branch_states)
    expected = ((a.float() + b.float() + c.float()) / 3).to(torch.bfloat16)
    assert torch.equal(merged_state["model.layers.0.self_attn.q_proj.weight"], expected)
    view = ExpertView(load(out))
    branch = branch_states[2]
    fused = torch.cat([branch["model.layers.1.mlp.gate_proj.weight"], branch["model.layers.1.mlp.up_proj.weight"]])
    assert torch.equal(view.read_expert((1, 2))["gate_up_proj"], fused)
    assert torch.equal(view.read_expert((1, 2))["down_proj"], branch["model.layers.1.mlp.down_proj.weight"])


def test_shared_seed_takes_the_seeds_tensors(merged):
    seed, _, out = merged("qwen3", shared="seed")
    merged_state, seed_state = load_file(out / "model.safetensors"), load_file(seed / "model.safetensors")
    names = [n for n in seed_state if ".mlp." not in n]
    assert len(names) == 2 + 2 * 8  # embeddings, final norm; per layer q/k/v/o, q/k norms, 2 layer norms
    for name in names:
        assert torch.equal(merged_state[name], seed_state[name]), name
    model = load(out)  # tied embeddings: lm_head is the seed's embedding
    assert torch.equal(model.lm_head.weight, seed_state["model.embed_tokens.weight"])


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_copies_of_the_seed_merge_to_the_seeds_function(tmp_path, model_type):
    """Every expert the seed's FFN, routing weights summing to 1: plain transformers gives the seed's logits."""
    seed, branches = make_set(tmp_path, model_type, copies=True)
    out = merge_branches(seed, branches, tmp_path / "out", shared="seed")
    model, seed_model = load(out), load(seed)
    ids = torch.randint(0, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        result = model(ids, labels=ids, output_router_logits=True)
        torch.testing.assert_close(result.logits, seed_model(ids).logits, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(result.loss) and torch.isfinite(result.aux_loss) and result.aux_loss > 0


def test_generalist_is_the_last_expert_and_the_seed_ffn(merged):
    seed, branches, out = merged("llama", generalist=True)
    view, seed_model = ExpertView(load(out)), load(seed)
    assert view.num_experts == 4
    x = torch.randn(5, TINY["hidden_size"], generator=torch.Generator().manual_seed(1))
    for layer in view.moe_layers:
        assert torch.equal(swiglu(x, view.read_expert((layer, 3))), seed_model.model.layers[layer].mlp(x))
        mlp = seed_model.model.layers[layer].mlp
        fused = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
        assert torch.equal(view.read_expert((layer, 3))["gate_up_proj"], fused)
    assert json.loads((out / PROVENANCE_FILE).read_text())["experts"] == [
        "branch 0",
        "branch 1",
        "branch 2",
        "seed (generalist)",
    ]


def test_qwen2_moe_shared_expert_is_the_seed_ffn_at_half_scale(merged):
    seed, _, out = merged("qwen2")
    model, seed_model = load(out), load(seed)
    view = ExpertView(model)
    assert model.config.shared_expert_intermediate_size == TINY["intermediate_size"]
    x = torch.randn(5, TINY["hidden_size"], generator=torch.Generator().manual_seed(2))
    for layer in view.moe_layers:
        shared, dense = view.shared_experts(layer), seed_model.model.layers[layer].mlp
        for proj in FFN:
            assert torch.equal(getattr(shared, proj).weight, getattr(dense, proj).weight)
        assert torch.equal(shared(x), dense(x))
        gate = view.shared_expert_gate(layer)
        assert torch.equal(gate.weight, torch.zeros(1, TINY["hidden_size"]))
        assert torch.equal(torch.sigmoid(gate(x)), torch.full((5, 1), 0.5))


def test_router_rows_given_or_seeded(tmp_path, merged):
    seed, branches = make_set(tmp_path, "llama")
    rows_EH = torch.randn(3, TINY["hidden_size"], generator=torch.Generator().manual_seed(5))
    view = ExpertView(load(merge_branches(seed, branches, tmp_path / "given", router_init=rows_EH)))
    assert all(torch.equal(view.read_router(layer), rows_EH) for layer in view.moe_layers)
    rows_LEH = torch.randn(2, 3, TINY["hidden_size"], dtype=torch.float64)
    view = ExpertView(load(merge_branches(seed, branches, tmp_path / "per-layer", router_init=rows_LEH)))
    assert all(torch.equal(view.read_router(layer), rows_LEH[layer].float()) for layer in view.moe_layers)

    def routers(out):
        view = ExpertView(load(out))
        return torch.stack([view.read_router(layer) for layer in view.moe_layers])

    first, again = routers(merged("llama")[2]), routers(merge_branches(seed, branches, tmp_path / "again"))
    other = routers(merge_branches(seed, branches, tmp_path / "seed1", seed=1))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert first.mean().abs() < 0.03 and 0.08 < first.std() < 0.12  # normal(0, initializer_range=0.1)
    assert not torch.equal(first[0], first[1])  # each layer its own draw


def test_provenance_and_tokenizer_files(merged):
    seed, branches, out = merged("llama")
    provenance = json.loads((out / PROVENANCE_FILE).read_text())
    assert (out / PROVENANCE_FILE).read_text() == json.dumps(provenance, indent=2) + "\n"  # the format of before
    assert provenance["seed"] == {"path": str(seed), "fingerprint": checkpoint_fingerprint(seed), "model_type": "llama"}
    assert provenance["branches"] == [{"path": str(b), "fingerprint": checkpoint_fingerprint(b)} for b in branches]
    assert provenance["options"] == {
        "family": "mixtral",
        "generalist": False,
        "shared": "average",
        "router_init": "random",
        "seed": 0,
        "chunks": 1,
    }
    for name, text in TOKENIZER.items():
        assert (out / name).read_text() == text
    assert not list(out.parent.glob(".out.partial-*"))


def variant(root: Path, model_type: str = "llama", **overrides) -> Path:
    return save_dense(perturbed(dense_model(model_type, **overrides), 9), root / "variant")


REFUSALS = {
    "hidden size": (
        lambda root, seed, branches: {"branch_paths": [branches[0], variant(root, hidden_size=96)]},
        "branch 1 .*'hidden_size': seed 64, branch 96",
    ),
    "tokenizer": (
        lambda root, seed, branches: {
            "branch_paths": [
                branches[0],
                save_dense(perturbed(load(seed), 4), root / "tok", {"tokenizer.json": '{"model": {}}'}),
            ]
        },
        "tokenizer file 'tokenizer.json' differs",
    ),
    "extra tokenizer file": (
        lambda root, seed, branches: {
            "branch_paths": [
                branches[0],
                save_dense(perturbed(load(seed), 4), root / "tok", {**TOKENIZER, "added_tokens.json": "{}"}),
            ]
        },
        "has tokenizer file 'added_tokens.json', the seed has none",
    ),
    "model type": (
        lambda root, seed, branches: {"branch_paths": [branches[0], variant(root, "qwen3")]},
        "branch 1 .* is a qwen3 model, the seed a llama",
    ),
    "dtype": (
        lambda root, seed, branches: {
            "branch_paths": [branches[0], save_dense(load(seed).to(torch.bfloat16), root / "bf16")]
        },
        "is BF16, in the seed F32. Re-save the branch in the seed's dtype",
    ),
    "one branch": (lambda root, seed, branches: {"branch_paths": branches[:1]}, "at least 2 branches, got 1"),
    "same branch twice": (
        lambda root, seed, branches: {"branch_paths": [branches[0], branches[1], branches[0]]},
        "branch 2 .* is also branch 0",
    ),
    "seed as branch": (lambda root, seed, branches: {"branch_paths": [seed, branches[0]]}, "is the seed itself"),
    "out inside the seed": (lambda root, seed, branches: {"out_dir": seed / "merged"}, "is inside the seed checkpoint"),
    "llama into qwen3_moe": (
        lambda root, seed, branches: {"family": "qwen3_moe"},
        "cannot hold a llama seed's attention .* family='mixtral'",
    ),
    "unknown family": (lambda root, seed, branches: {"family": "olmoe"}, "family='olmoe' is not one BTX writes"),
    "unknown shared": (lambda root, seed, branches: {"shared": "median"}, "shared='median'"),
    "chunks not dividing the width": (
        lambda root, seed, branches: {"chunks": 3},
        "chunks=3 does not divide the FFN width intermediate_size=32: choose a divisor of 32",
    ),
    "no chunks": (lambda root, seed, branches: {"chunks": 0}, "chunks=0: expected a positive integer"),
    "router rows of whole experts with chunks": (
        lambda root, seed, branches: {"chunks": 2, "router_init": torch.zeros(3, 64)},
        r"expected float \[E, H\] = \[6, 64\] .* a source's chunks one after another",
    ),
    "router shape": (
        lambda root, seed, branches: {"router_init": torch.zeros(4, 64)},
        r"router_init .* shape \[4, 64\]; expected float \[E, H\] = \[3, 64\]",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusals_write_nothing(tmp_path, merged, case):
    seed, branches, _ = merged("llama")
    make, message = REFUSALS[case]
    kwargs = {"branch_paths": branches, "out_dir": tmp_path / "out", **make(tmp_path, seed, branches)}
    out, before, seed_files = Path(kwargs["out_dir"]), outside(Path(kwargs["out_dir"])), sorted(seed.iterdir())
    with pytest.raises(ModelError, match=message):
        merge_branches(seed, kwargs.pop("branch_paths"), kwargs.pop("out_dir"), **kwargs)
    assert not out.exists() and outside(out) == before and sorted(seed.iterdir()) == seed_files


def test_refuses_seeds_the_family_cannot_hold(tmp_path, merged):
    seed, branches = make_set(tmp_path, "llama", mlp_bias=True)
    with pytest.raises(ModelError, match="mlp_bias=True; mixtral has no place for it"):
        merge_branches(seed, branches, tmp_path / "out")
    seed, branches, _ = merged("qwen2")
    with pytest.raises(ModelError, match="qwen2_moe already keeps it as the always-on shared expert"):
        merge_branches(seed, branches, tmp_path / "out", generalist=True)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model_type", sorted(FAMILY))
@pytest.mark.parametrize("chunks", [2, 4])
def test_chunks_are_slices_of_their_branch_ffn_that_sum_to_it(merged, model_type, chunks):
    seed, branches, out = merged(model_type, chunks=chunks)
    model = load(out)
    view = ExpertView(model)
    assert (view.num_experts, view.top_k) == (3 * chunks, 2 * chunks)
    width = TINY["intermediate_size"] // chunks
    x = torch.randn(7, TINY["hidden_size"], generator=torch.Generator().manual_seed(3))
    for i, path in enumerate(branches):
        branch = load(path)
        for layer in view.moe_layers:
            mlp = branch.model.layers[layer].mlp
            parts = [view.read_expert((layer, i * chunks + c)) for c in range(chunks)]
            for c, part in enumerate(parts):
                rows = slice(c * width, (c + 1) * width)
                gate, up = part["gate_up_proj"].chunk(2, dim=0)
                assert torch.equal(gate, mlp.gate_proj.weight[rows]) and torch.equal(up, mlp.up_proj.weight[rows])
                assert torch.equal(part["down_proj"], mlp.down_proj.weight[:, rows] * chunks)  # exact: a power of 2
            total = sum(swiglu(x, part) for part in parts) / chunks
            torch.testing.assert_close(total, mlp(x), rtol=0, atol=1e-6)
    if model_type == "qwen2":  # the shared expert is the seed's whole FFN
        assert model.config.shared_expert_intermediate_size == TINY["intermediate_size"]
        assert model.config.moe_intermediate_size == width


@pytest.mark.parametrize("model_type", sorted(FAMILY))
def test_chunked_experts_with_repeated_router_rows_compute_what_whole_experts_compute(tmp_path, model_type):
    seed, branches = make_set(tmp_path, model_type)
    generalist = model_type != "qwen2"  # qwen2_moe keeps the seed's FFN as its shared expert instead
    sources = len(branches) + int(generalist)
    rows_LSH = torch.randn(2, sources, TINY["hidden_size"], generator=torch.Generator().manual_seed(7))
    whole = load(merge_branches(seed, branches, tmp_path / "whole", generalist=generalist, router_init=rows_LSH))
    chunked = load(
        merge_branches(seed, branches, tmp_path / "chunked", generalist=generalist, chunks=4,
                       router_init=rows_LSH.repeat_interleave(4, dim=1))
    )  # fmt: skip
    input_ids = torch.randint(0, TINY["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(chunked(input_ids).logits, whole(input_ids).logits, rtol=0, atol=1e-5)
    provenance = json.loads((tmp_path / "chunked" / PROVENANCE_FILE).read_text())
    assert provenance["router"]["top_k"] == 8 and provenance["experts"][:2] == [
        "branch 0, chunk 0 of 4",
        "branch 0, chunk 1 of 4",
    ]
