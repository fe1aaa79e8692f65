"""Boost chosen experts at inference, by hook or folded into the weights of a plain transformers model.

Hu et al. 2026 raise accuracy by boosting a domain's driver and domain experts at inference. A
:class:`Reweighting` names the experts and their factors and how the factor acts::

    boost = Reweighting({(2, 5): 1.5, (3, 1): 1.2}, mode="weight_scale")
    with boost.apply(model):                       # router edits (connito.routing.edits), any layout
        logits = model(input_ids).logits
    fold_into_weights(model, boost)                # the same logits with no hook, where that is exact

Modes (factor f > 0 per (layer, expert); f = 1 changes nothing):

* ``weight_scale``: :class:`~connito.routing.edits.ExpertWeightScale`: the expert's routing weight times f where a
  token chose it, the family's top-k renormalisation re-applied; the choice never changes.
* ``logit_bias``: :class:`~connito.routing.edits.RouterLogitBias` with bias ``ln f`` on the expert's router logit,
  before the top-k choice: in a softmax family the expert's unnormalised probability times f (it may now be
  chosen where it was not); in DeepSeek-V3 (sigmoid) its odds times f.

**What folds exactly** (:func:`fold_into_weights`), for a routed expert ``y = w * down_proj @ (silu(gate @ x) *
(up @ x))``, linear in ``down_proj``:

* ``weight_scale`` on a layer whose family does not renormalise its top-k weights (qwen3_moe, qwen2_moe, olmoe,
  flex_olmo with ``norm_topk_prob=False``; deepseek_v2; deepseek_v3 with ``norm_topk_prob=False``): the new weight
  is ``f * w`` on every token that chose the expert and the choice is unchanged, so ``down_proj[e] *= f`` gives
  the same output (to fp rounding), routed scaling factor included.
* ``weight_scale`` on a renormalising layer (Mixtral always; the others with ``norm_topk_prob=True``): the new
  weight is ``f w_e / (f w_e + sum of the token's other chosen weights)`` and the *other* chosen experts' weights
  shrink by the same token-dependent denominator; no per-expert constant reproduces that. Refused.
* ``logit_bias``: refused for every family. Softmax families: ``softmax(logits + b)`` changes which experts a token
  chooses and all chosen weights through the token's own denominator, and their routers have no bias term.
  DeepSeek-V3: ``e_score_correction_bias`` is added to ``sigmoid(logits)`` for the choice only, while the edit
  moves ``sigmoid(logits + b)``, the weight as well; and ``sigmoid(l + b) - sigmoid(l)`` depends on the token,
  so no constant choice bias reproduces even the choice.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from connito.experts import ExpertView
from connito.experts.blocks import HFMoEBlock
from connito.routing.edits import ExpertWeightScale, RouterEdit, RouterLogitBias, log_factor, routing_rule

Mode = Literal["weight_scale", "logit_bias"]
MODES = ("weight_scale", "logit_bias")


@dataclass(frozen=True)
class Reweighting:
    """Factors ``boost[(layer, expert)] = f`` (> 0) applied in ``mode`` (see the module docstring)."""

    boost: Mapping[tuple[int, int], float] = field(default_factory=dict)
    mode: Mode = "weight_scale"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"Reweighting mode must be one of {', '.join(MODES)}, got '{self.mode}'")
        for expert_id, factor in self.boost.items():
            if not (isinstance(factor, int | float) and math.isfinite(factor) and factor > 0):
                raise ValueError(f"boost factor of expert {tuple(expert_id)} must be finite and > 0, got {factor!r}")

    def edit_values(self) -> dict[tuple[int, int], float]:
        """What the router edit gets: the factors (``weight_scale``) or the biases ``ln f`` (``logit_bias``)."""
        if self.mode == "weight_scale":
            return {tuple(k): float(f) for k, f in self.boost.items()}
        return {tuple(k): log_factor(f) for k, f in self.boost.items()}

    def apply(self, model: nn.Module, view: ExpertView | None = None) -> RouterEdit:
        """Hook the reweighting on ``model``'s routers; ``remove()`` it or use it as a context manager."""
        edit = ExpertWeightScale if self.mode == "weight_scale" else RouterLogitBias
        return edit(model, self.edit_values(), view=view)


def fold_into_weights(model: nn.Module, reweighting: Reweighting) -> nn.Module:
    """Edit ``model`` (a plain transformers model) in place so that it computes the reweighted logits with no hook,
    and return it; refuses with :class:`ValueError` naming the family and the reason where no weight edit is exact
    (see the module docstring). Nothing is changed when it refuses."""
    view = ExpertView(model)
    reason = fold_refusal(view, reweighting)
    if reason is not None:
        raise ValueError(reason)
    boosted = {view.check_id(k): f for k, f in reweighting.boost.items() if f != 1}
    for expert_id, factor in sorted(boosted.items()):
        tensors = view.read_expert(expert_id)
        tensors["down_proj"] = tensors["down_proj"] * factor
        view.write_expert(expert_id, tensors)
    return model


def fold_refusal(view: ExpertView, reweighting: Reweighting) -> str | None:
    """Why :func:`fold_into_weights` would refuse ``reweighting`` on the model ``view`` sees, or None where the
    fold is exact. Changes nothing."""
    family = view.family.model_type
    boosted = {view.check_id(k): f for k, f in reweighting.boost.items() if f != 1}
    for layer, _ in boosted:
        if not isinstance(view.block(layer), HFMoEBlock):
            return (
                f"fold_into_weights: layer {layer} is a DeepSpeed AutoEP layer; fold on the exported transformers "
                "model (parallel.ep_size=1)"
            )
    if reweighting.mode == "logit_bias" and boosted:
        return _logit_bias_refusal(family)
    for layer in sorted({layer for layer, _ in boosted}):
        if routing_rule(view, layer).renormalize:
            return (
                f"fold_into_weights: {family} renormalises its top-k routing weights ({_renorm_reason(family)}), so "
                "scaling one expert's weight by f gives each token f*w_e / (f*w_e + its other chosen weights) and "
                "shrinks those others by the same token-dependent amount; no change of expert weights reproduces "
                "it. Keep the reweighting as a hook (`with reweighting.apply(model): ...`)."
            )
    return None


def _renorm_reason(family: str) -> str:
    return "always" if family == "mixtral" else "norm_topk_prob=True"


def _logit_bias_refusal(family: str) -> str:
    alternative = (
        "Keep the reweighting as a hook (`with reweighting.apply(model): ...`), or use mode='weight_scale', which "
        "folds exactly for families that do not renormalise their top-k weights."
    )
    if family == "deepseek_v3":
        return (
            "fold_into_weights: a logit bias does not fold into deepseek_v3's e_score_correction_bias: that bias is "
            "added to sigmoid(logits) for the choice only, while the logit bias moves sigmoid(logits + b), which "
            "weights the chosen expert too, and sigmoid(l + b) - sigmoid(l) depends on the token, so no constant "
            f"choice bias reproduces even the choice. {alternative}"
        )
    return (
        f"fold_into_weights: a logit bias does not fold into {family}'s weights: softmax(logits + b) changes which "
        "experts each token chooses and every chosen weight through the token's own denominator, and its router "
        f"has no bias term to hold b. {alternative}"
    )
