"""BAM upcycling: tiny dense seeds and 3 perturbed branches -> FFN and soft-routed attention experts, in a
checkpoint transformers loads with remote code.

Checked against BAM's definition written out here (Zhang et al. 2024, sec. 3): attention expert i is branch i's
attention, the layer's attention output is ``sum_i softmax(W_r x)_i * Attn_i(x)``; with key/value sharing the
experts share one k/v projection (the branches' mean); a parallel block is ``x + Attn(n1(x)) + FFN(n2(x))``.
"""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from connito.composition.bam_merge import PROVENANCE_FILE, BAMError, merge_bam
from connito.experts import ExpertView
from connito.models.custom.modeling_connito_bam import SoftAttentionExperts
from tests.composition.test_composition_btx_merge import FAMILY, TINY, load, make_set

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


@pytest.fixture(scope="module")
def upcycled(tmp_path_factory):
    """``upcycled(model_type, **options)`` -> (seed, branches, out); each combination built once."""
    cache = {}

    def get(model_type: str, **options):
        key = (model_type, tuple(sorted(options.items())))
        if key not in cache:
            root = tmp_path_factory.mktemp(f"bam-{model_type}")
            seed, branches = make_set(root, model_type)
            cache[key] = (seed, branches, merge_bam(seed, branches, root / "out", **options))
        return cache[key]

    return get


def weights(path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(f).items()}


def ids(batch=2, seq=12):
    return torch.randint(0, TINY["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
@pytest.mark.parametrize("kv_sharing", [False, True])
def test_copies_of_the_seed_upcycle_to_the_seeds_function(tmp_path, model_type, kv_sharing):
    """Every FFN and attention expert the seed's, both mixtures' weights summing to 1: the seed's logits."""
    seed, branches = make_set(tmp_path, model_type, copies=True)
    out = merge_bam(seed, branches, tmp_path / "out", kv_sharing=kv_sharing)
    model, seed_model = load(out), load(seed)
    assert type(model).__name__.startswith("ConnitoBam") and model.config.attention_experts == 3
    with torch.no_grad():
        result = model(ids(), labels=ids(), output_router_logits=True)
        torch.testing.assert_close(result.logits, seed_model(ids()).logits, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(result.aux_loss) and result.aux_loss > 0  # the FFN router's balance loss


@pytest.mark.parametrize("model_type", sorted(FAMILY))
def test_attention_expert_i_is_branch_i_and_the_layer_mixes_them_softly(upcycled, model_type):
    seed, branches, out = upcycled(model_type)
    state, model = weights(out), load(out)
    branch_states = [weights(b) for b in branches]
    for layer in range(TINY["num_hidden_layers"]):
        prefix = f"model.layers.{layer}.self_attn."
        for i, branch in enumerate(branch_states):
            for name in [n for n in branch if n.startswith(prefix)]:
                assert torch.equal(state[f"{prefix}experts.{i}.{name[len(prefix) :]}"], branch[name]), name
        # the layer's output against the definition, computed from three plain attention modules of the family
        attn = model.model.layers[layer].self_attn
        assert isinstance(attn, SoftAttentionExperts)
        dense = [load(b) for b in branches]
        x = torch.randn(2, 7, TINY["hidden_size"], generator=torch.Generator().manual_seed(layer))
        position_ids = torch.arange(7).expand(2, -1)
        rope = model.model.rotary_emb(x, position_ids)
        with torch.no_grad():
            got, _ = attn(x, rope, attention_mask=None)
            p = torch.softmax(x @ state[f"{prefix}router.weight"].T, dim=-1)
            expected = sum(
                p[..., i : i + 1] * d.model.layers[layer].self_attn(x, rope, attention_mask=None)[0]
                for i, d in enumerate(dense)
            )
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_key_value_sharing_keeps_one_mean_projection(upcycled):
    seed, branches, out = upcycled("qwen3", kv_sharing=True)
    state, branch_states = weights(out), [weights(b) for b in branches]
    for layer in range(TINY["num_hidden_layers"]):
        prefix = f"model.layers.{layer}.self_attn."
        for name in ("k_proj.weight", "v_proj.weight", "k_norm.weight"):
            mean = sum(b[prefix + name] for b in branch_states) / 3
            torch.testing.assert_close(state[prefix + name], mean, rtol=0, atol=1e-7)
            assert not any(f"{prefix}experts.{i}.{name}" in state for i in range(3))
        for i, branch in enumerate(branch_states):
            for name in ("q_proj.weight", "o_proj.weight", "q_norm.weight"):
                assert torch.equal(state[f"{prefix}experts.{i}.{name}"], branch[prefix + name])
    # keys and values cached once per layer: generation with the cache equals recomputing every prefix
    model = load(out)
    prompt = ids(1, 5)
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=6, do_sample=False)
        tokens = prompt
        for _ in range(6):
            tokens = torch.cat([tokens, model(tokens).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(cached, tokens)


def test_the_parallel_block_reads_the_layer_input_in_both_branches(upcycled):
    seed, branches, out = upcycled("llama", parallel_block=True)
    model = load(out)
    layer = model.model.layers[0]
    x = torch.randn(1, 6, TINY["hidden_size"], generator=torch.Generator().manual_seed(3))
    rope = model.model.rotary_emb(x, torch.arange(6)[None])
    with torch.no_grad():
        got = layer(x, position_embeddings=rope, attention_mask=None)
        attention = layer.self_attn(layer.input_layernorm(x), rope, attention_mask=None)[0]
        expected = x + attention + layer.mlp(layer.post_attention_layernorm(x))
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    seed_logits = load(seed)(ids()).logits
    assert not torch.allclose(model(ids()).logits, seed_logits, atol=1e-3)  # not the sequential seed's function


def test_the_remote_code_checkpoint_reloads_in_a_fresh_process_with_equal_logits(upcycled, tmp_path):
    seed, branches, out = upcycled("qwen3", kv_sharing=True)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "connito_bam_qwen3_moe"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_connito_bam.ConnitoBamQwen3MoeForCausalLM"
    assert (out / "modeling_connito_bam.py").is_file()
    with torch.no_grad():
        expected = load(out)(ids()).logits
    torch.save({"ids": ids(), "logits": expected}, tmp_path / "expected.pt")
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()\n"
        "assert type(model).__module__.startswith('transformers_modules'), type(model).__module__\n"
        f"saved = torch.load({str(tmp_path / 'expected.pt')!r})\n"
        "with torch.no_grad():\n"
        "    diff = (model(saved['ids']).logits - saved['logits']).abs().max().item()\n"
        "print(diff)\n"
    )
    # a plain interpreter that never imports connito: the classes come from the checkpoint's own file
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert float(proc.stdout.strip().splitlines()[-1]) <= 1e-5


def test_the_expert_view_and_provenance_see_the_ffn_experts(upcycled):
    seed, branches, out = upcycled("qwen3")
    view = ExpertView(load(out))
    assert view.moe_layers == [0, 1] and view.num_experts == 3 and view.top_k == 2
    record = json.loads((out / PROVENANCE_FILE).read_text())
    assert record["schema"] == "connito.bam/1" and record["attention"]["kv_sharing"] is False
    assert record["attention"]["experts"] == ["branch 0", "branch 1", "branch 2"]


def test_refusals_name_the_fix(tmp_path, upcycled):
    seed, branches, out = upcycled("llama")
    with pytest.raises(BAMError, match="BAM merges at least 2 branches"):
        merge_bam(seed, branches[:1], tmp_path / "one")
    with pytest.raises(BAMError, match="attention_router_init='mean'"):
        merge_bam(seed, branches, tmp_path / "bad", attention_router_init="mean")
    assert not (tmp_path / "bad").exists()
    with pytest.raises(BAMError, match=r"router"):
        merge_bam(seed, branches, tmp_path / "shape", attention_router_init=torch.zeros(5, TINY["hidden_size"]))


def test_expert_parallelism_is_refused_with_the_reason():
    from connito.parallel.expert_parallel import ExpertParallelError, validate_expert_parallel

    with pytest.raises(ExpertParallelError, match=r"connito_bam_qwen3_moe.*AutoEP's presets .* no expert parallelism"):
        validate_expert_parallel(2, 2, "connito_bam_qwen3_moe", 4, zero_stage=0, check_installed=False)


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_router_edits_route_a_bam_model_by_its_base_familys_rule(upcycled, model_type):
    """The driver scan of `connito analyze` perturbs routing through these rules."""
    from connito.routing.edits import routing_rule

    seed, branches, out = upcycled(model_type)
    view = ExpertView(load(out))
    assert routing_rule(view, 0) is not None and routing_rule(view, 1) is not None
