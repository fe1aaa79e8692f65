"""The experts forward through :class:`connito.experts.lean.slots.LeanSlots`: the same grouped GEMMs as
transformers' ``grouped_mm`` path (and AutoEP's ``GroupedExperts``), with a backward that computes the input gradient
for every routed row but the weight gradient only for the slots' experts, straight into the slots.

:class:`SlotGroupedLinear` is one grouped linear ``y_SN[s] = x_SK[s] @ W_ENK[e(s)]^T`` over rows sorted by expert:

* forward: ``grouped_mm`` over the fused (frozen) weight, the call transformers makes, so the output is bit for bit
  the output of the plain path once the slots are synced into the fused rows (:meth:`LeanSlots.sync`, which this
  forward runs first);
* backward: ``dx = grouped_mm(dy, W)`` for every row; ``dW`` only for the slots' experts
  (:func:`connito.kernels.expert_weight_grad`: their row ranges alone enter the GEMMs, a torch loop on the CPU, a
  Triton kernel on CUDA), returned as the gradient of the slot parameter. The fused weight gets no gradient and has
  none to hold.

Families: every transformers experts module declared with ``@use_experts_implementation`` and the defaults Connito's
families use (gated, concatenated, untransposed, no bias, no post-expert norm): :func:`supports` says which.

Shape legend: S routed (token, expert) rows sorted by expert, T tokens, K top-k, H hidden size, I expert FFN width,
E experts, G slots.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from connito.experts.lean.slots import LeanSlots, slots_of


def _grouped_mm(x_SK: torch.Tensor, w_EKN: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    if hasattr(F, "grouped_mm"):
        return F.grouped_mm(x_SK, w_EKN, offs=offsets_E)
    return torch._grouped_mm(x_SK, w_EKN, offs=offsets_E)


class SlotGroupedLinear(torch.autograd.Function):
    """``(x_SK, weight_ENK, slot_GNK, offsets_E, experts_G) -> y_SN``; gradients for ``x_SK`` and ``slot_GNK``."""

    @staticmethod
    def forward(ctx, x_SK, weight_ENK, slot_GNK, offsets_E, experts_G):
        ctx.save_for_backward(x_SK, weight_ENK, offsets_E, experts_G)
        ctx.slots = slot_GNK.shape[0]
        return _grouped_mm(x_SK.to(weight_ENK.dtype), weight_ENK.transpose(-2, -1), offsets_E)

    @staticmethod
    def backward(ctx, dy_SN):
        from connito.kernels import expert_weight_grad

        x_SK, weight_ENK, offsets_E, experts_G = ctx.saved_tensors
        dy_SN = dy_SN.contiguous()
        dx_SK = _grouped_mm(dy_SN, weight_ENK, offsets_E).to(x_SK.dtype) if ctx.needs_input_grad[0] else None
        dslot_GNK = None
        if ctx.needs_input_grad[2]:
            real = experts_G.numel()  # the real slots come first; the rest are padding (expert parallelism)
            dslot_GNK = weight_ENK.new_empty((ctx.slots,) + tuple(weight_ENK.shape[1:]))
            dslot_GNK[real:].zero_()
            if real:  # writes every real slot (zeros for an expert no row was routed to)
                expert_weight_grad(x_SK, dy_SN, offsets_E, experts_G, out=dslot_GNK[:real])
        return dx_SK, None, dslot_GNK, None, None


def slot_linear(x_SK, weight_ENK, slot_GNK, offsets_E, experts_G) -> torch.Tensor:
    return SlotGroupedLinear.apply(x_SK, weight_ENK, slot_GNK, offsets_E, experts_G)


def supports(experts: nn.Module) -> bool:
    """Whether ``experts`` is a transformers experts module of the layout the lean forward computes."""
    return (
        getattr(experts, "has_gate", False)
        and getattr(experts, "is_concatenated", True)
        and not getattr(experts, "is_transposed", True)
        and not getattr(experts, "has_bias", True)
        and not getattr(experts, "has_post_expert_norm", True)
        and isinstance(getattr(experts, "gate_up_proj", None), nn.Parameter)
        and isinstance(getattr(experts, "down_proj", None), nn.Parameter)
    )


def lean_experts_forward(self: nn.Module, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
    """The ``connito_lean`` experts implementation: transformers' ``grouped_mm`` forward, step for step, with the
    slot-aware grouped linear; modules without slots run transformers' own ``grouped_mm`` path."""
    from transformers.integrations.moe import grouped_mm_experts_forward

    slots = slots_of(self)
    if slots is None or not slots.bound_to(self.gate_up_proj):
        # no slots, or a call with substituted (e.g. detached) parameters: the plain path, no gradient to the slots
        if slots is not None:
            slots.sync()
        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    slots.sync()
    num_top_k = top_k_index.size(-1)
    num_tokens, hidden_dim = hidden_states.size(0), hidden_states.size(-1)
    sample_weights = top_k_weights.reshape(-1)
    expert_ids_g, perm = torch.sort(top_k_index.reshape(-1))
    selected_SH = hidden_states[perm // num_top_k]
    sample_weights_g = sample_weights[perm]
    histc_input = expert_ids_g.float() if hidden_states.device.type in ("cpu", "mps") else expert_ids_g.int()
    tokens_per_expert = torch.histc(histc_input, bins=self.num_experts, min=0, max=self.num_experts - 1)
    offsets_E = torch.cumsum(tokens_per_expert, dim=0, dtype=torch.int32)
    experts_G = slots.experts_G

    proj = slot_linear(selected_SH, self.gate_up_proj, slots.gate_up_proj, offsets_E, experts_G)
    proj = self._apply_gate(proj)
    proj = slot_linear(proj, self.down_proj, slots.down_proj, offsets_E, experts_G)
    weighted_SH = proj * sample_weights_g.unsqueeze(-1)
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.size(0), device=perm.device)
    weighted_SH = weighted_SH[inv_perm]
    return weighted_SH.view(num_tokens, num_top_k, hidden_dim).sum(dim=1).to(hidden_states.dtype)


def _register() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    from connito.experts.lean.install import EXPERTS_IMPLEMENTATION

    if EXPERTS_IMPLEMENTATION not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPLEMENTATION, lean_experts_forward)


_register()


@functools.cache
def lean_grouped_experts_class() -> type:
    """``LeanGroupedExperts``, built on first use: DeepSpeed is imported only where expert parallelism runs."""
    from deepspeed.moe.ep_experts import GroupedExperts, apply_expert_activation

    class LeanGroupedExperts(GroupedExperts):
        """AutoEP's ``GroupedExperts`` computing through its layer's slots: ``w1``/``w3``/``w2`` [E/N, ...] stay its
        (frozen) parameters under their names; the gate, up and down GEMMs are AutoEP's ``grouped_mm`` path with
        the slot-aware backward."""

        @classmethod
        def adopt(cls, module: nn.Module) -> None:
            if not isinstance(module, GroupedExperts):
                raise TypeError(f"expected AutoEP's GroupedExperts, got {type(module).__name__}")
            module.__class__ = cls

        def forward(self, x: torch.Tensor, num_tokens_per_expert: torch.Tensor) -> torch.Tensor:
            slots: LeanSlots | None = slots_of(self)
            if slots is None:
                return super().forward(x, num_tokens_per_expert)
            slots.sync()
            offsets_E = torch.cumsum(num_tokens_per_expert, dim=0, dtype=torch.int32)
            width = self.w1.shape[1]
            experts_G = slots.experts_G
            gate = slot_linear(x, self.w1, slots.gate_up_proj[:, :width], offsets_E, experts_G)
            up = slot_linear(x, self.w3, slots.gate_up_proj[:, width:], offsets_E, experts_G)
            h = apply_expert_activation(gate, up, self.activation, self.activation_alpha, self.activation_limit)
            return slot_linear(h, self.w2, slots.down_proj, offsets_E, experts_G).type_as(x)

    return LeanGroupedExperts
