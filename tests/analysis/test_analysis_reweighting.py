"""Reweighting: factor 1 changes nothing; folded into the weights it reproduces the hooked logits in plain
transformers where folding is exact (weight_scale on families without top-k renormalisation), and is refused with
the family and the reason elsewhere, leaving the model untouched."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from connito.analysis.reweighting import Reweighting, fold_into_weights
from connito.routing.edits import RouterLogitBias
from tests.experts.conftest import build_tiny

BOOST = {(1, 3): 2.5, (2, 0): 0.4, (2, 6): 1.7}


def input_ids(rows: int = 2, seq: int = 16) -> torch.Tensor:
    return torch.randint(3, 128, (rows, seq), generator=torch.Generator().manual_seed(5))


def logits(model, reweighting: Reweighting | None = None) -> torch.Tensor:
    with torch.no_grad():
        if reweighting is None:
            return model(input_ids()).logits
        with reweighting.apply(model):
            return model(input_ids()).logits


def state(model) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


@pytest.mark.parametrize("mode", ["weight_scale", "logit_bias"])
def test_factor_one_is_the_identity_and_a_boost_is_not(mode):
    model = build_tiny("deepseek_v3")
    ones = Reweighting({expert_id: 1.0 for expert_id in BOOST}, mode=mode)
    assert torch.equal(logits(model, ones), logits(model))
    assert (logits(model, Reweighting(BOOST, mode=mode)) - logits(model)).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_folding_factor_one_changes_no_weight(family):
    """Factor 1 folds everywhere (nothing to do), even on a family that renormalises."""
    model = build_tiny(family)
    before = state(model)
    fold_into_weights(model, Reweighting({expert_id: 1.0 for expert_id in BOOST}))
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())


@pytest.mark.parametrize(
    ("family", "overrides"),
    [("qwen3_moe", {}), ("deepseek_v2", {"routed_scaling_factor": 2.0}), ("deepseek_v3", {"norm_topk_prob": False})],
)
def test_folded_export_reproduces_the_reweighted_logits_in_plain_transformers(tmp_path, family, overrides):
    """Families without top-k renormalisation: hooked logits == logits of the folded model saved with
    save_pretrained and loaded back by plain transformers (rtol 1e-5); only the boosted experts' down_proj moved,
    by exactly their factor."""
    boost = {(2, 3): 2.5, (2, 0): 0.4, (1, 6): 1.7}  # layer 0 is dense in DeepSeek's tiny models
    model = build_tiny(family, **overrides)
    reweighting = Reweighting(boost, mode="weight_scale")
    expected, plain = logits(model, reweighting), logits(model)
    assert (expected - plain).abs().max() > 1e-3
    before = state(model)
    assert fold_into_weights(model, reweighting) is model
    for name, tensor in model.state_dict().items():
        if name.endswith("experts.down_proj"):
            layer = int(name.split(".")[2])
            factors = torch.tensor([boost.get((layer, e), 1.0) for e in range(tensor.shape[0])])
            torch.testing.assert_close(tensor, before[name] * factors.view(-1, 1, 1), rtol=0, atol=0)
        else:
            assert torch.equal(tensor, before[name]), name
    model.save_pretrained(tmp_path)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(exported), expected, rtol=1e-5, atol=1e-5)


def test_weight_scale_fold_is_refused_for_a_renormalising_family_with_the_reason():
    model = build_tiny("mixtral")
    before = state(model)
    with pytest.raises(ValueError) as refused:
        fold_into_weights(model, Reweighting(BOOST))
    assert str(refused.value) == (
        "fold_into_weights: mixtral renormalises its top-k routing weights (always), so scaling one expert's weight "
        "by f gives each token f*w_e / (f*w_e + its other chosen weights) and shrinks those others by the same "
        "token-dependent amount; no change of expert weights reproduces it. Keep the reweighting as a hook "
        "(`with reweighting.apply(model): ...`)."
    )
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
    qwen = build_tiny("qwen3_moe", norm_topk_prob=True)
    with pytest.raises(ValueError, match=r"qwen3_moe renormalises its top-k routing weights \(norm_topk_prob=True\)"):
        fold_into_weights(qwen, Reweighting(BOOST))


def test_folding_is_not_exact_where_refused():
    """Why the refusal: on Mixtral, scaling down_proj[e] by f does not give the hooked logits."""
    model = build_tiny("mixtral")
    hooked = logits(model, Reweighting(BOOST))
    with torch.no_grad():
        for (layer, expert), factor in BOOST.items():
            model.model.layers[layer].mlp.experts.down_proj[expert] *= factor
    assert (logits(model) - hooked).abs().max() > 1e-3


def test_logit_bias_fold_is_refused_for_deepseek_v3_with_the_reason():
    model = build_tiny("deepseek_v3")
    before = state(model)
    with pytest.raises(ValueError) as refused:
        fold_into_weights(model, Reweighting({(1, 3): 2.0}, mode="logit_bias"))
    assert str(refused.value) == (
        "fold_into_weights: a logit bias does not fold into deepseek_v3's e_score_correction_bias: that bias is added "
        "to sigmoid(logits) for the choice only, while the logit bias moves sigmoid(logits + b), which weights the "
        "chosen expert too, and sigmoid(l + b) - sigmoid(l) depends on the token, so no constant choice bias "
        "reproduces even the choice. Keep the reweighting as a hook (`with reweighting.apply(model): ...`), or use "
        "mode='weight_scale', which folds exactly for families that do not renormalise their top-k weights."
    )
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
    with pytest.raises(ValueError, match="a logit bias does not fold into qwen3_moe's weights: softmax"):
        fold_into_weights(build_tiny("qwen3_moe"), Reweighting({(1, 3): 2.0}, mode="logit_bias"))


def test_logit_bias_mode_adds_ln_factor_to_the_logit():
    """mode='logit_bias' with factor f is RouterLogitBias with ln f: the same logits."""
    model = build_tiny("qwen3_moe")
    hooked = logits(model, Reweighting({(1, 3): 3.0}, mode="logit_bias"))
    with RouterLogitBias(model, {(1, 3): math.log(3.0)}), torch.no_grad():
        assert torch.equal(model(input_ids()).logits, hooked)


def test_bad_reweightings_are_refused():
    with pytest.raises(ValueError, match="Reweighting mode must be one of weight_scale, logit_bias, got 'scale'"):
        Reweighting(BOOST, mode="scale")
    with pytest.raises(ValueError, match=r"boost factor of expert \(1, 3\) must be finite and > 0, got 0.0"):
        Reweighting({(1, 3): 0.0})


def test_reweighting_effect_measures_each_boost_on_every_domain():
    from connito.analysis.reweighting_effect import reweighting_effect

    model = build_tiny("qwen3_moe")
    gen = torch.Generator().manual_seed(2)
    inputs = [torch.randint(3, 128, (2, 16), generator=gen) for _ in range(2)]
    domains = [torch.randint(0, 2, (2, 16), generator=gen) for _ in range(2)]
    boost = Reweighting({(1, 3): 3.0, (2, 0): 2.0})
    effect = reweighting_effect(model, inputs, domains, [boost, Reweighting({(1, 3): 1.0})], progress=False)
    assert torch.equal(effect.loss_RD[1], effect.loss_D)  # factor 1: the routed loss, bit for bit
    with torch.no_grad(), boost.apply(model):
        by_hand = [torch.nn.functional.cross_entropy(model(ids).logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(),
                                                     reduction="none") for ids in inputs]  # fmt: skip
    targets = torch.cat([d[:, 1:].flatten() for d in domains])
    losses = torch.cat(by_hand).double()
    expected = torch.stack([losses[targets == d].mean() for d in range(2)])
    torch.testing.assert_close(effect.loss_RD[0], expected, rtol=1e-6, atol=1e-6)
    assert (effect.change_RD[0].abs() > 1e-4).all()


def test_export_reweighted_writes_a_plain_checkpoint_with_the_boosted_logits(tmp_path):
    from connito.analysis.reweighting_effect import export_reweighted

    model = build_tiny("qwen3_moe", norm_topk_prob=False)
    model.save_pretrained(tmp_path / "base")
    (tmp_path / "base" / "tokenizer.json").write_text("{}")
    boost = Reweighting({(1, 3): 3.0, (2, 0): 2.0})
    before = state(model)
    out = export_reweighted(model, tmp_path / "base", boost, tmp_path / "reweighted-code")
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())  # model untouched
    assert (out / "tokenizer.json").is_file() and not (tmp_path / ".reweighted-code.tmp").exists()
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(logits(loaded), logits(model, boost), rtol=1e-5, atol=1e-5)


def test_fold_refusal_says_why_without_changing_anything():
    from connito.analysis.reweighting import fold_refusal
    from connito.experts import ExpertView

    model = build_tiny("qwen3_moe", norm_topk_prob=True)
    view = ExpertView(model)
    assert "renormalises its top-k routing weights" in fold_refusal(view, Reweighting({(1, 3): 2.0}))
    assert fold_refusal(view, Reweighting({(1, 3): 1.0})) is None
    plain = ExpertView(build_tiny("qwen3_moe", norm_topk_prob=False))
    assert fold_refusal(plain, Reweighting({(1, 3): 2.0})) is None
    assert "logit bias does not fold" in fold_refusal(plain, Reweighting({(1, 3): 2.0}, mode="logit_bias"))
