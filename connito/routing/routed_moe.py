"""The common frame of Connito's routing modes: a replacement forward for a transformers MoE block.

A routing mode is an ``nn.Module`` (a :class:`RoutedMoE` subclass) that becomes a child ``connito_routing`` of the
family's MoE block and takes over the block's ``forward`` (an instance attribute shadowing the class method; the
block's modules and their parameter names do not change). Its parameters and buffers (a route predictor, moving
thresholds) are therefore part of the model: the optimizer trains them and the engine's checkpoints carry them.
:func:`install` and :func:`uninstall` put it on and take it off.

What the replacement forward does, for every supported family (all reached through the expert view's
:class:`~connito.experts.blocks.HFMoEBlock`: router module, stacked experts, shared expert and its gate):

1. ``logits_TE`` = the first output of the family's router module (called as the family calls it, so transformers
   still records the router logits for its load-balancing loss, router edits still apply, and a
   :class:`~connito.routing.RouterObserver` still sees a record: the family's *top-k* decision on these logits, not
   the route the mode takes; a routing record has K experts per token and these modes do not);
2. ``scores_TE`` = the family's scoring of the logits (softmax over experts per token; sigmoid for DeepSeek-V3,
   whose router is trained for it), fp32; the weight of expert e's output for token t is ``scale * scores[t, e]``
   (``scale``: DeepSeek's ``routed_scaling_factor``, 1 elsewhere). No top-k renormalisation (a token may have any
   number of experts) and no group limit or choice bias (they shape a per-token top-k, which these modes replace);
3. the subclass's :meth:`RoutedMoE.routed` decides which (token, expert) pairs run and returns the routed output;
4. the family's shared expert is added as the family adds it (Qwen2-MoE: times ``sigmoid(shared_expert_gate(x))``;
   DeepSeek: plain sum).

Mixtral's ``router_jitter_noise`` (0 in every shipped config) is not applied.

Shape legend: T tokens of the forward (B x S), E routed experts, H hidden size, K experts per token.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import nn

from connito.experts.blocks import HFMoEBlock
from connito.routing.edits import SCORING, RoutingRule

ATTR = "connito_routing"
"""The name of the routing module inside the family's MoE block (state dict keys ``<block>.connito_routing.*``)."""


def expert_capacity(num_tokens: int, capacity_factor: float, top_k: int, num_experts: int) -> int:
    """Tokens per expert: ``C = round(T * capacity_factor * top_k / E)`` (halves round up), at least 1 and at most T.

    E x C = capacity_factor x T x top_k expert-token products per forward: at ``capacity_factor=1`` the same
    compute as the family's top-k routing of the same T tokens (the formula of Zhou et al. 2022 with k = top_k)."""
    capacity = math.floor(num_tokens * capacity_factor * top_k / num_experts + 0.5)
    return min(max(capacity, 1), num_tokens)


class RoutedMoE(nn.Module, ABC):
    """One MoE block's routing mode; subclasses implement :meth:`routed`."""

    mode: str = ""

    def __init__(self, block: HFMoEBlock, rule: RoutingRule, capacity_factor: float):
        super().__init__()
        self._block = block  # a plain object (not an nn.Module): not registered as a child, so no cycle
        self.scoring, self.scale, self.top_k = rule.scoring, float(rule.scale), rule.top_k
        self.num_experts = block.num_experts
        self.capacity_factor = float(capacity_factor)
        self.last_mask_TE: torch.Tensor | None = None
        """The (token, expert) pairs the last forward ran, detached."""
        self.train_stats: dict[str, float] = {}
        """Statistics of the last training forward (for the run's metrics)."""

    def capacity(self, num_tokens: int) -> int:
        return expert_capacity(num_tokens, self.capacity_factor, self.top_k, self.num_experts)

    @property
    def block(self) -> HFMoEBlock:
        return self._block

    def block_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The MoE block's forward under this routing mode (see the module docstring)."""
        hidden_TH = hidden_states.reshape(-1, hidden_states.shape[-1])
        logits_TE = self._block.router_module(hidden_TH)[0]
        scores_TE = SCORING[self.scoring](logits_TE)
        out_TH = self.routed(hidden_TH, scores_TE)
        shared = self._block.shared_experts()
        if shared is not None:
            shared_TH = shared(hidden_TH)
            gate = self._block.shared_expert_gate()
            if gate is not None:
                shared_TH = torch.sigmoid(gate(hidden_TH)) * shared_TH
            out_TH = out_TH + shared_TH
        return out_TH.reshape(hidden_states.shape)

    @abstractmethod
    def routed(self, hidden_TH: torch.Tensor, scores_TE: torch.Tensor) -> torch.Tensor:
        """The routed experts' output [T, H] for ``hidden_TH`` given the family's ``scores_TE``; sets
        ``last_mask_TE`` (and ``train_stats`` in training)."""

    def _record(self, mask_TE: torch.Tensor, capacity: int, **extra: float) -> None:
        self.last_mask_TE = mask_TE.detach()
        if self.training:
            per_expert = mask_TE.sum(dim=0).float()
            per_token = mask_TE.sum(dim=1).float()
            self.train_stats = {
                "max_load": float(per_expert.max()) / capacity,
                "experts_per_token": float(per_token.mean()),
                "unrouted_tokens": float((per_token == 0).float().mean()),
                **extra,
            }


def install(block: HFMoEBlock, routed: RoutedMoE) -> None:
    """Make ``routed`` the block's child ``connito_routing`` and its forward."""
    if hasattr(block.module, ATTR):
        raise ValueError(f"{block.prefix} already has a routing mode ('{ATTR}'); take it off first")
    block.module.add_module(ATTR, routed)
    block.module.forward = routed.block_forward


def uninstall(block: HFMoEBlock) -> None:
    """The block's own forward and modules again."""
    if hasattr(block.module, ATTR):
        delattr(block.module, ATTR)
    block.module.__dict__.pop("forward", None)
