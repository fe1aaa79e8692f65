"""Branch-Train-Stitch: a frozen hub (the seed) and frozen branches joined by stitch layers, in a checkpoint
transformers loads with remote code.

Checked against the stitch's definition written out here: after layer l (every ``stitch_every``), with hub state h
and branch states b_i, ``h' = h + sum_i softmax(G h)_i P_i b_i`` and ``b_i' = b_i + sigmoid(g_i . h) Q_i h``; the
output is the hub's LM head on the hub's last state.
"""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from connito.composition.bts_stitch import PROVENANCE_FILE, BTSError, opt_out_branches, stitch_branches
from tests.composition.test_composition_btx_merge import TINY, load, make_set

NAMES = ["code", "docs", "prose"]


@pytest.fixture(scope="module")
def stitched(tmp_path_factory):
    cache = {}

    def get(model_type: str, **options):
        key = (model_type, tuple(sorted(options.items())))
        if key not in cache:
            root = tmp_path_factory.mktemp(f"bts-{model_type}")
            seed, branches = make_set(root, model_type)
            cache[key] = (seed, branches, stitch_branches(seed, branches, root / "out", branch_names=NAMES, **options))
        return cache[key]

    return get


def weights(path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(f).items()}


def ids(batch=2, seq=12):
    return torch.randint(0, TINY["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(0))


def trained(model, seed=7):
    """The stitches given non-zero projections (as training would), everything else untouched."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("stitches."):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "qwen2"])
def test_zero_stitches_compute_the_hubs_logits_exactly(stitched, model_type):
    seed, branches, out = stitched(model_type)
    model, hub = load(out), load(seed)
    assert type(model).__name__ == "ConnitoBtsForCausalLM" and model.config.branch_names == NAMES
    with torch.no_grad():
        assert torch.equal(model(ids()).logits, hub(ids()).logits)


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_hub_and_branches_are_their_checkpoints_bit_for_bit(stitched, model_type):
    seed, branches, out = stitched(model_type)
    state, hub = weights(out), weights(seed)
    for name, tensor in hub.items():
        assert torch.equal(state[f"hub.{name}"], tensor), name
    for i, branch in enumerate(branches):
        for name, tensor in weights(branch).items():
            if name.startswith("model."):
                assert torch.equal(state[f"branches.{i}.{name[len('model.') :]}"], tensor), name
    stitch_names = {n for n in state if n.startswith("stitches.")}
    assert len({n.split(".")[1] for n in stitch_names}) == TINY["num_hidden_layers"] // 2  # stitch_every=2


def test_the_forward_is_the_stitch_definition(stitched):
    seed, branches, out = stitched("llama", stitch_every=1)
    model = trained(load(out))
    hub, dense = load(seed), [load(b) for b in branches]
    x = ids(1, 9)
    with torch.no_grad():
        h = hub.model.embed_tokens(x)
        bs = [d.model.embed_tokens(x) for d in dense]
        positions = torch.arange(9)[None]
        rope = hub.model.rotary_emb(h, positions)
        mask = torch.full((9, 9), float("-inf")).triu(1)[None, None]
        for layer in range(TINY["num_hidden_layers"]):
            h = hub.model.layers[layer](h, attention_mask=mask, position_embeddings=rope, position_ids=positions)
            bs = [d.model.layers[layer](b, attention_mask=mask, position_embeddings=rope, position_ids=positions)
                  for d, b in zip(dense, bs)]  # fmt: skip
            s = model.stitches[layer]
            p = torch.softmax(h @ s.to_hub_gate.weight.T, dim=-1)
            g = torch.sigmoid(h @ s.to_branch_gate.weight.T)
            h_new = h + sum(p[..., i : i + 1] * (bs[i] @ s.to_hub[i].weight.T) for i in range(3))
            bs = [bs[i] + g[..., i : i + 1] * (h @ s.to_branch[i].weight.T) for i in range(3)]
            h = h_new
        expected = hub.lm_head(hub.model.norm(h))
        torch.testing.assert_close(model(x).logits, expected, atol=1e-5, rtol=1e-5)


def test_opting_a_branch_out_renormalises_over_the_others_without_retraining(stitched, tmp_path):
    seed, branches, out = stitched("qwen3")
    full = trained(load(out))
    full.save_pretrained(tmp_path / "trained")
    without = load(tmp_path / "trained")
    without.config.active_branches = ["code", "prose"]
    smaller = load(opt_out_branches(tmp_path / "trained", ["docs"], tmp_path / "no-docs"))
    assert smaller.config.branch_names == ["code", "prose"] and len(smaller.branches) == 2
    with torch.no_grad():
        assert not torch.allclose(full(ids()).logits, without(ids()).logits)  # docs did contribute
        torch.testing.assert_close(smaller(ids()).logits, without(ids()).logits, atol=1e-6, rtol=1e-6)
    # the definition: the to-hub softmax over code and prose only, docs' stitch rows unused
    stitch = smaller.stitches[0]
    assert torch.equal(stitch.to_hub_gate.weight, full.stitches[0].to_hub_gate.weight[[0, 2]])
    assert torch.equal(stitch.to_hub[1].weight, full.stitches[0].to_hub[2].weight)
    record = json.loads((tmp_path / "no-docs" / PROVENANCE_FILE).read_text())
    assert record["opted_out"] == ["docs"]
    with pytest.raises(BTSError, match="keep at least one"):
        opt_out_branches(tmp_path / "trained", NAMES, tmp_path / "none")
    bad = load(tmp_path / "trained")
    bad.config.active_branches = ["math"]
    with pytest.raises(ValueError, match=r"active_branches names \['math'\]"):
        bad(ids())


def test_the_remote_code_checkpoint_reloads_in_a_fresh_process_with_equal_logits(stitched, tmp_path):
    seed, branches, out = stitched("qwen3")
    model = trained(load(out))
    model.save_pretrained(tmp_path / "trained")
    config = json.loads((tmp_path / "trained" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_connito_bts.ConnitoBtsForCausalLM"
    with torch.no_grad():
        torch.save({"ids": ids(), "logits": model(ids()).logits}, tmp_path / "expected.pt")
    code = (
        "import torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'trained')!r}, trust_remote_code=True).eval()\n"
        "assert type(model).__module__.startswith('transformers_modules'), type(model).__module__\n"
        f"saved = torch.load({str(tmp_path / 'expected.pt')!r})\n"
        "with torch.no_grad():\n"
        "    print((model(saved['ids']).logits - saved['logits']).abs().max().item())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert float(proc.stdout.strip().splitlines()[-1]) <= 1e-5


def test_refusals_name_the_fix(stitched, tmp_path):
    seed, branches, out = stitched("llama")
    with pytest.raises(BTSError, match=r"stitch_every=3: .* 1 <= k <= 2"):
        stitch_branches(seed, branches, tmp_path / "x", stitch_every=3)
    with pytest.raises(BTSError, match="one distinct name per branch"):
        stitch_branches(seed, branches, tmp_path / "y", branch_names=["a", "a", "b"])
    with pytest.raises(BTSError, match="is a connito_bts checkpoint, not|not a BTS one"):
        opt_out_branches(seed, ["code"], tmp_path / "z")
    assert not any((tmp_path / n).exists() for n in "xyz")
