"""REAP saliency: equal to a brute-force reference (each routed token's expert output computed alone by the model's
own experts module), 0 for never-routed experts; pruning by it keeps the most salient experts and writes a model
equal to the one with the others opted out."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from connito.analysis.held_out import HeldOut
from connito.experts import ExpertView
from connito.retirement.pruning import PruningError, prune_checkpoint
from connito.retirement.saliency import reap_saliency
from connito.routing.opt_out import OptOut, in_every_layer
from tests.experts.conftest import TINY, build_tiny

GENERATOR = torch.Generator().manual_seed(11)
BATCHES = [torch.randint(3, 128, (2, 12), generator=GENERATOR) for _ in range(2)]
DOMAINS = [torch.zeros(2, 12, dtype=torch.long), torch.ones(2, 12, dtype=torch.long)]
DOMAINS[1][1, 8:] = -1  # padding: left out


def brute_force_saliency(model, batches, domain_ids) -> torch.Tensor:
    """For every token and each expert it is routed to, run the model's own experts module on that token alone
    with that expert at weight 1, and average gate weight x output norm per expert."""
    view = ExpertView(model)
    seen = {}
    handles = [
        block.experts_module.register_forward_pre_hook(
            lambda module, args, layer=layer: seen.setdefault(layer, []).append(args)
        )
        for layer, block in view.blocks()
    ]
    with torch.no_grad():
        for input_BS in batches:
            model(input_ids=input_BS, use_cache=False)
    for handle in handles:
        handle.remove()
    total = torch.zeros(len(view.moe_layers), view.num_experts, dtype=torch.float64)
    count = torch.zeros_like(total)
    with torch.no_grad():
        for i, (layer, block) in enumerate(view.blocks()):
            for (hidden_TH, ids_TK, weights_TK), domain_BS in zip(seen[layer], domain_ids):
                for t in range(hidden_TH.shape[0]):
                    if domain_BS.reshape(-1)[t] < 0:
                        continue
                    for k in range(ids_TK.shape[1]):
                        expert = int(ids_TK[t, k])
                        alone = block.experts_module(
                            hidden_TH[t : t + 1], ids_TK[t : t + 1, k : k + 1], torch.ones(1, 1)
                        )
                        total[i, expert] += float(weights_TK[t, k]) * alone.double().norm()
                        count[i, expert] += 1
    return torch.where(count > 0, total / count.clamp_min(1), 0.0)


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_reap_saliency_equals_the_brute_force_reference(model_type):
    model = build_tiny(model_type)
    saliency = reap_saliency(model, BATCHES, DOMAINS)
    expected = brute_force_saliency(model, BATCHES, DOMAINS)
    assert saliency.moe_layers == ExpertView(model).moe_layers
    assert saliency.tokens == sum(int((d >= 0).sum()) for d in DOMAINS)
    torch.testing.assert_close(saliency.saliency_LE, expected, rtol=1e-5, atol=1e-7)
    assert (saliency.saliency_LE > 0).any()


def test_a_never_routed_expert_scores_zero():
    model = build_tiny("qwen3_moe")
    with OptOut(model, in_every_layer(5)):  # expert 5 is never chosen; the saliency sees the edited routing
        saliency = reap_saliency(model, BATCHES, DOMAINS)
    assert (saliency.routed_LE[:, 4] > 0).all()
    assert (saliency.routed_LE[:, 5] == 0).all() and (saliency.saliency_LE[:, 5] == 0).all()


def test_pruning_by_reap_keeps_the_most_salient_experts(tmp_path):
    model = build_tiny("qwen3_moe")
    path = tmp_path / "ckpt"
    model.save_pretrained(path)
    calibration = HeldOut(["code", "docs"], BATCHES, DOMAINS)
    out, plan = prune_checkpoint(path, None, 3, tmp_path / "reap-3", score="reap", calibration=calibration)
    saliency = reap_saliency(model, BATCHES, DOMAINS).saliency_LE
    for i, layer in enumerate(plan.moe_layers):
        top = sorted(saliency[i].argsort(descending=True, stable=True)[:3].tolist())
        assert plan.kept[layer] == top
    pruned = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert pruned.config.num_experts == 3
    with torch.no_grad(), OptOut(model, plan.removed):
        expected = model(BATCHES[0]).logits
    with torch.no_grad():
        assert torch.equal(pruned(BATCHES[0]).logits, expected)
    with pytest.raises(PruningError, match="score='reap' measures saliency on calibration text"):
        prune_checkpoint(path, None, 3, tmp_path / "x", score="reap")
    with pytest.raises(PruningError, match="keep=1 is below the model's top-k"):
        prune_checkpoint(path, None, 1, tmp_path / "x", score="reap", calibration=calibration)
    assert not (tmp_path / "x").exists()


def test_connito_prune_score_reap_calibrates_on_the_workloads_train_split(tmp_path, monkeypatch):
    from connito.analysis import held_out
    from connito.cli.commands.prune import PruneConfig, run

    path = tmp_path / "ckpt"
    build_tiny("qwen3_moe").save_pretrained(path)
    asked = {}

    def fake_batches(data, tokenizer_dir, *, domains=None, eval_tokens=0, split="validation", **_):
        asked.update(domains=domains, eval_tokens=eval_tokens, split=split)
        return HeldOut(["code", "docs"], BATCHES, DOMAINS)

    monkeypatch.setattr(held_out, "held_out_batches", fake_batches)
    out = tmp_path / "reap-4"
    cfg = PruneConfig(checkpoint=str(path), keep=4, score="reap", domains=["code"], out=str(out), eval_tokens=0,
                      calibration_tokens=100)  # fmt: skip
    run(cfg, tmp_path)  # no analysis anywhere: REAP needs none
    assert asked == {"domains": ["code"], "eval_tokens": 100, "split": "train"}
    record = json.loads((out / "prune_report.json").read_text())
    assert record["score"] == "reap" and record["calibration"]["tokens"] == 48
    assert all(len(kept) == 4 for kept in record["kept"].values())
    assert "by REAP saliency" in (out / "prune_report.md").read_text()
