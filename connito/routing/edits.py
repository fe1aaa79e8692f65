"""Router edits: forward hooks that *change* what every MoE router decides (the counterpart of observation).

An edit hooks each MoE layer's router, in either layout, and returns an edited router output; the model is never
modified and the edit comes off with ``remove()`` or at the end of a ``with`` block::

    with ExpertWeightScale(model, {(2, 5): 2.0}):       # expert 5 of layer 2 weighs twice as much where chosen
        logits = model(input_ids).logits
    with RouterLogitBias(model, {(2, 5): 1.5}):         # +1.5 on its router logit, before the top-k choice
        logits = model(input_ids).logits
    with KeepTopExperts(model, keep=1):                 # every token keeps only its highest-weighted expert
        logits = model(input_ids).logits

Values are a dict ``{(layer, expert): value}`` (global numbering; missing experts get the neutral value), a tensor
[M, E] (rows in ``view.moe_layers`` order), or a tensor [G, M, E]: *row blocks*. With G blocks the forward's T
tokens (``B x S`` flattened row-major, as every MoE block sees them) are cut into G equal contiguous blocks and
block g gets ``values[g]``: replicate a batch G times along the batch dimension and copy g carries edit g, so one
forward measures G edits (the causal scan of :mod:`connito.analysis.drivers` does this). Tokens none of whose
values differ from the neutral one keep the router's own output bit for bit, so a zero edit (factor 1, bias 0) is
the identity (logits bit-identical) and a neutral row block routes as unedited. (Its logits can still move by fp
rounding, ~1e-6, when another block's logit bias changes choices: the experts' grouped matmuls change size.) Edit
hooks run before any other forward hook on the router (``prepend``), so a :class:`~connito.routing.RouterObserver`
records the routing the block actually used.

**ExpertWeightScale** (factors f >= 0). It changes weights, never the choice: a token's chosen experts stay chosen
and an unchosen expert stays unchosen whatever its factor, so its effect is measured where the router already uses
the expert. For a token with chosen experts k, scores p_k (softmax probability or sigmoid score), output weights w_k:

* families that do not renormalise their top-k weights (qwen/olmoe/flex_olmo with ``norm_topk_prob=False``,
  DeepSeek-V2, DeepSeek-V3 with ``norm_topk_prob=False``): ``w'_k = f_k * w_k`` (= s * f_k * p_k);
* families that do (Mixtral always; qwen/olmoe/flex_olmo/DeepSeek-V3 with ``norm_topk_prob=True``): the scaled
  scores are renormalised and the routed scaling factor s re-applied, ``w'_k = s * f_k p_k / sum_j f_j p_j``,
  computed as ``s * f_k w_k / sum_j f_j w_j`` (the same, as ``w_k`` is ``p_k`` times a per-token constant). The
  other chosen experts' weights move too; with top-1 routing a positive factor changes nothing. If every chosen
  expert of a token has factor 0 its weights are 0 (no routed output).

**RouterLogitBias** (finite biases b). Adds b to the router logits before scoring, as if the router had a bias
term, and routes with the family's own rule (:class:`RoutingRule`): the choice *and* the weights change.

* softmax families (Qwen, Mixtral, OLMoE, FlexOlmo, DeepSeek-V2): ``softmax(logits + b)``, i.e. expert e's
  unnormalised probability times ``exp(b_e)``, then the family's top-k (group-limited for DeepSeek-V2's
  ``group_limited_greedy``), renormalisation and scaling. Where the chosen set does not change, a renormalising
  family's weights equal ExpertWeightScale with ``f = exp(b)``.
* DeepSeek-V3 (sigmoid): ``scores = sigmoid(logits + b)``; the choice uses ``scores + e_score_correction_bias``
  (group-limited), the weights use ``scores``. This is *not* a change of the choice bias: the choice bias moves the
  choice score by a constant and leaves the weights alone, while ``sigmoid(l + b) - sigmoid(l)`` depends on the
  token and the chosen expert's weight moves with it. A logit bias saturates there: it raises an expert's choice
  score by at most ``1 - sigmoid(l)``, so with group-limited choice its group can still lose.

transformers routers compute their logits inside ``forward``, so the hook recomputes the routing from the logits
it returns plus the bias with :class:`RoutingRule` (which reproduces each family's router bit for bit at zero bias;
the tests check it) and returns the biased logits with it. AutoEP's ``TokenChoiceTopKRouter`` computes its logits
in its ``gate`` ``nn.Linear``: the hook adds the bias to the gate's output and the router routes as it always does.

Shape legend: T tokens of the forward (B x S), E routed experts, K experts per token, M MoE layers (in
``view.moe_layers`` order), G row blocks.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from connito.experts import ExpertView
from connito.experts.blocks import HFMoEBlock, MoEBlock

# -- the families' routing rules ---------------------------------------------------------------------------------

SCORING: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "softmax": lambda logits_TE: torch.softmax(logits_TE, dim=-1, dtype=torch.float32),
    "sigmoid": lambda logits_TE: logits_TE.float().sigmoid(),
}
"""How a router turns logits into expert scores (fp32), by scoring type."""


@dataclass(frozen=True, eq=False)
class RoutingRule:
    """How one router turns logits [T, E] into top-k ids and weights, as its family does.

    scores = SCORING[scoring](logits); choice = scores (+ choice_bias); with groups (n_group, topk_group) only the
    topk_group groups with the best group score (``max`` of the group's choice scores: DeepSeek-V2; ``top2_sum``:
    DeepSeek-V3) stay choosable; ids = top-k of choice; weights = scores[ids], renormalised to sum 1 if
    ``renormalize``, times ``scale``.
    """

    scoring: Literal["softmax", "sigmoid"]
    top_k: int
    renormalize: bool
    scale: float = 1.0
    groups: tuple[int, int] | None = None
    group_score: Literal["max", "top2_sum"] = "top2_sum"
    choice_bias_E: torch.Tensor | None = None
    sorted_topk: bool = True

    def route(self, logits_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights_TK fp32, ids_TK) for ``logits_TE``."""
        scores_TE = SCORING[self.scoring](logits_TE)
        choice_TE = scores_TE if self.choice_bias_E is None else scores_TE + self.choice_bias_E
        if self.groups is not None:
            choice_TE = _group_limited(choice_TE, *self.groups, self.group_score)
        ids_TK = torch.topk(choice_TE, self.top_k, dim=-1, sorted=self.sorted_topk).indices
        weights_TK = scores_TE.gather(1, ids_TK)
        if self.renormalize:
            weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
        return weights_TK * self.scale, ids_TK


def _group_limited(choice_TE: torch.Tensor, num_groups: int, keep_groups: int, group_score: str) -> torch.Tensor:
    """``choice_TE`` with every expert outside each token's ``keep_groups`` best groups set to -inf."""
    grouped_TGE = choice_TE.view(choice_TE.shape[0], num_groups, -1)
    if group_score == "max":
        group_scores_TG = grouped_TGE.max(dim=-1).values
    else:
        group_scores_TG = grouped_TGE.topk(2, dim=-1).values.sum(dim=-1)
    keep_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool)
    keep_TG.scatter_(1, torch.topk(group_scores_TG, k=keep_groups, dim=-1, sorted=False).indices, True)
    return grouped_TGE.masked_fill(~keep_TG.unsqueeze(-1), float("-inf")).view_as(choice_TE)


def _softmax_rule(renormalize: Callable[[nn.Module], bool]) -> Callable[[nn.Module], RoutingRule]:
    return lambda router: RoutingRule("softmax", router.top_k, renormalize(router))


def _deepseek_v2_rule(router: nn.Module) -> RoutingRule:
    grouped = router.topk_method == "group_limited_greedy"
    groups = (router.num_group, router.topk_group) if grouped else None
    return RoutingRule("softmax", router.top_k, False, router.routed_scaling_factor, groups, "max", sorted_topk=False)


def _deepseek_v3_rule(router: nn.Module) -> RoutingRule:
    return RoutingRule(
        "sigmoid",
        router.top_k,
        bool(router.norm_topk_prob),
        router.routed_scaling_factor,
        (router.num_group, router.topk_group),
        "top2_sum",
        router.e_score_correction_bias,
        sorted_topk=False,
    )


_RULES: dict[str, Callable[[nn.Module], RoutingRule]] = {}


def register_routing_rule(model_type: str, rule: Callable[[nn.Module], RoutingRule], *, replace: bool = False):
    """Teach the edits a family's routing: ``rule(router_module) -> RoutingRule`` for its transformers router."""
    if model_type in _RULES and not replace:
        raise ValueError(f"a routing rule for '{model_type}' is already registered; pass replace=True to override it")
    _RULES[model_type] = rule


for _model_type in ("qwen3_moe", "qwen2_moe", "olmoe", "flex_olmo"):
    register_routing_rule(_model_type, _softmax_rule(lambda router: bool(router.norm_topk_prob)))
register_routing_rule("mixtral", _softmax_rule(lambda router: True))
# BAM models (connito.models.custom) keep their base family's FFN router, so they route by its rule
for _model_type in ("connito_bam_qwen3_moe", "connito_bam_qwen2_moe"):
    register_routing_rule(_model_type, _softmax_rule(lambda router: bool(router.norm_topk_prob)))
register_routing_rule("connito_bam_mixtral", _softmax_rule(lambda router: True))
register_routing_rule("deepseek_v2", _deepseek_v2_rule)
register_routing_rule("deepseek_v3", _deepseek_v3_rule)


def routing_rule(view: ExpertView, layer: int) -> RoutingRule:
    """The routing rule of MoE layer ``layer`` as it runs now: a transformers router by its family's registered
    rule, an AutoEP router from its own settings (``score_func``, ``route_norm``, ``route_scale``, groups, choice
    bias; not the load-balancing ``expert_bias`` AutoEP passes to its forward)."""
    block = view.block(layer)
    router = block.router_module
    if isinstance(block, HFMoEBlock):
        model_type = view.family.model_type
        if model_type not in _RULES:
            raise ValueError(
                f"router edits do not know how {model_type} routes: register its rule with "
                "connito.routing.edits.register_routing_rule"
            )
        return _RULES[model_type](router)
    groups = None
    if router.num_expert_groups is not None:
        groups = (router.num_expert_groups, router.num_limited_groups)
    return RoutingRule(
        router.score_func,
        router.top_k,
        bool(router.route_norm),
        float(router.route_scale),
        groups,
        router.group_score_func,
        router.e_score_correction_bias,
        sorted_topk=False,
    )


# -- edits -------------------------------------------------------------------------------------------------------

EditValues = Mapping[tuple[int, int], float] | torch.Tensor


def edit_values(view: ExpertView, values: EditValues, neutral: float) -> torch.Tensor:
    """``values`` as an fp32 tensor [G, M, E] (see the module docstring); refuses what does not fit the model."""
    num_moe, num_experts = len(view.moe_layers), view.num_experts
    if isinstance(values, torch.Tensor):
        values_GME = values.detach().to("cpu", torch.float32)
        if values_GME.dim() == 2:
            values_GME = values_GME.unsqueeze(0)
        if values_GME.dim() != 3 or tuple(values_GME.shape[1:]) != (num_moe, num_experts) or values_GME.shape[0] < 1:
            raise ValueError(
                f"edit values have shape {tuple(values.shape)}; expected [{num_moe}, {num_experts}] (MoE layers "
                f"{view.moe_layers} x experts) or [G, {num_moe}, {num_experts}] for G row blocks"
            )
    else:
        values_GME = torch.full((1, num_moe, num_experts), float(neutral))
        for expert_id, value in values.items():
            layer, expert = view.check_id(expert_id)
            values_GME[0, view.moe_layers.index(layer), expert] = float(value)
    if not torch.isfinite(values_GME).all():
        raise ValueError("edit values must be finite")
    return values_GME


class RouterEdit(ABC):
    """Forward hooks on every MoE router of ``model`` that replace its routing; a context manager.

    Subclasses set ``neutral`` (the value that changes nothing) and hook one block in :meth:`_hook`.
    """

    neutral: float = 0.0

    def __init__(self, model: nn.Module, values: EditValues, *, view: ExpertView | None = None):
        self.view = view or ExpertView(model)
        self.values_GME = edit_values(self.view, values, self.neutral)
        self._check(self.values_GME)
        self._handles = []
        for index, (layer, block) in enumerate(self.view.blocks()):
            routing_rule(self.view, layer)  # refuse a family without a rule now, not in the middle of a forward
            self._handles.extend(self._hook(layer, block, self.values_GME[:, index]))

    @property
    def num_blocks(self) -> int:
        return self.values_GME.shape[0]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> RouterEdit:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def _check(self, values_GME: torch.Tensor) -> None:  # noqa: B027 - optional for subclasses
        """Refuse values this edit cannot apply (subclasses override; the default accepts any)."""

    @abstractmethod
    def _hook(self, layer: int, block: MoEBlock, values_GE: torch.Tensor) -> list:
        """Register this edit's hooks on ``block`` and return their handles."""

    def _per_token(self, values_GE: torch.Tensor, num_tokens: int, like: torch.Tensor) -> torch.Tensor:
        """[T, E] (or [1, E] with one block): row block g's values for each of its T / G tokens."""
        values_GE = values_GE.to(like.device)
        if self.num_blocks == 1:
            return values_GE
        if num_tokens % self.num_blocks:
            raise ValueError(
                f"the forward routes {num_tokens} tokens, which do not split into {self.num_blocks} equal row blocks: "
                f"replicate the batch {self.num_blocks} times along the batch dimension"
            )
        return values_GE.repeat_interleave(num_tokens // self.num_blocks, dim=0)


def _keep_unedited(edited_T: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """``new`` for edited tokens, ``old`` (bit for bit) for the others."""
    return torch.where(edited_T.view(-1, *([1] * (old.dim() - 1))), new.to(old.dtype), old)


class ExpertWeightScale(RouterEdit):
    """Multiply the routing weight of chosen experts by a factor per (layer, expert), renormalising as the family
    does (see the module docstring for the exact rule). Factor 1 is neutral; factors must be >= 0."""

    neutral = 1.0

    def _check(self, values_GME: torch.Tensor) -> None:
        if (values_GME < 0).any():
            raise ValueError(f"ExpertWeightScale factors must be >= 0, got {values_GME.min().item()}")

    def _hook(self, layer: int, block: MoEBlock, values_GE: torch.Tensor) -> list:
        def scale(weights_TK: torch.Tensor, ids_TK: torch.Tensor) -> torch.Tensor:
            factors_TE = self._per_token(values_GE, ids_TK.shape[0], weights_TK)
            factors_TK = factors_TE.expand(ids_TK.shape[0], -1).gather(1, ids_TK)
            scaled_TK = weights_TK.float() * factors_TK
            rule = routing_rule(self.view, layer)
            if rule.renormalize:  # s * f_k w_k / sum_j f_j w_j; 0 where every chosen factor is 0
                total_T1 = scaled_TK.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
                scaled_TK = scaled_TK / total_T1 * rule.scale
            return _keep_unedited((factors_TK != 1).any(dim=-1), scaled_TK, weights_TK)

        if isinstance(block, HFMoEBlock):

            def hf_hook(module, args, output):
                logits_TE, weights_TK, ids_TK = output
                return logits_TE, scale(weights_TK, ids_TK), ids_TK

            return [block.router_module.register_forward_hook(hf_hook, prepend=True)]

        def autoep_hook(module, args, output):
            weights_TK, ids_TK, *rest = output
            return (scale(weights_TK, ids_TK), ids_TK, *rest)

        return [block.router_module.register_forward_hook(autoep_hook, prepend=True)]


class RouterLogitBias(RouterEdit):
    """Add a bias per (layer, expert) to the router logits before the top-k choice (see the module docstring for
    what that means per family). Bias 0 is neutral."""

    neutral = 0.0

    def _hook(self, layer: int, block: MoEBlock, values_GE: torch.Tensor) -> list:
        if isinstance(block, HFMoEBlock):

            def hf_hook(module, args, output):
                logits_TE, weights_TK, ids_TK = output
                bias_TE = self._per_token(values_GE, logits_TE.shape[0], logits_TE)
                edited_T = (bias_TE != 0).any(dim=-1).expand(logits_TE.shape[0])
                biased_TE = logits_TE + bias_TE.to(logits_TE.dtype)
                new_weights_TK, new_ids_TK = routing_rule(self.view, layer).route(biased_TE)
                return (
                    _keep_unedited(edited_T, biased_TE, logits_TE),
                    _keep_unedited(edited_T, new_weights_TK, weights_TK),
                    _keep_unedited(edited_T, new_ids_TK, ids_TK),
                )

            return [block.router_module.register_forward_hook(hf_hook, prepend=True)]

        def gate_hook(module, args, output):
            bias_TE = self._per_token(values_GE, output.shape[0], output)
            edited_T = (bias_TE != 0).any(dim=-1).expand(output.shape[0])
            return _keep_unedited(edited_T, output + bias_TE.to(output.dtype), output)

        return [block.router_module.gate.register_forward_hook(gate_hook, prepend=True)]


class KeepTopExperts(RouterEdit):
    """Every token keeps only its ``keep`` highest-weighted chosen experts (``keep=1``: single-expert routing, as in
    the single-expert-sufficiency test of Yuan et al. 2025); the others get weight 0.

    The kept experts are weighted as the family would weight a top-``keep`` choice: renormalising families
    (Mixtral; Qwen/OLMoE/FlexOlmo/DeepSeek-V3 with ``norm_topk_prob=True``) renormalise the kept scores to sum 1
    and re-apply the routed scaling factor (with ``keep=1`` the one expert gets weight ``s``); the others keep
    the weights the router gave (``s * p``). The choice itself never changes: "highest-weighted" ranks the chosen
    experts by routing weight (DeepSeek-V3's choice bias, which orders the choice but not the weights, does not
    enter). A dropped expert still runs in the grouped matmul with weight 0, so its contribution is exactly 0.
    ``keep >= top_k`` is the identity (bit for bit).
    """

    def __init__(self, model: nn.Module, keep: int = 1, *, view: ExpertView | None = None):
        if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
            raise ValueError(f"KeepTopExperts keeps at least one expert per token; got keep={keep!r}")
        self.keep = keep
        super().__init__(model, {}, view=view)

    def _hook(self, layer: int, block: MoEBlock, values_GE: torch.Tensor) -> list:
        def keep_top(weights_TK: torch.Tensor) -> torch.Tensor:
            if self.keep >= weights_TK.shape[-1]:
                return weights_TK
            kept_TK = torch.zeros_like(weights_TK, dtype=torch.bool)
            kept_TK.scatter_(1, weights_TK.topk(self.keep, dim=-1).indices, True)
            new_TK = torch.where(kept_TK, weights_TK.float(), 0.0)
            rule = routing_rule(self.view, layer)
            if rule.renormalize:
                total_T1 = new_TK.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
                new_TK = new_TK / total_T1 * rule.scale
            return new_TK.to(weights_TK.dtype)

        if isinstance(block, HFMoEBlock):

            def hf_hook(module, args, output):
                logits_TE, weights_TK, ids_TK = output
                return logits_TE, keep_top(weights_TK), ids_TK

            return [block.router_module.register_forward_hook(hf_hook, prepend=True)]

        def autoep_hook(module, args, output):
            weights_TK, ids_TK, *rest = output
            return (keep_top(weights_TK), ids_TK, *rest)

        return [block.router_module.register_forward_hook(autoep_hook, prepend=True)]


def log_factor(factor: float) -> float:
    """The logit bias that multiplies a softmax expert's unnormalised probability by ``factor`` (> 0)."""
    if not factor > 0 or not math.isfinite(factor):
        raise ValueError(f"a factor must be finite and > 0, got {factor}")
    return math.log(factor)
