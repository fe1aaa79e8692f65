"""Run a transformers MoE block's routed experts on an arbitrary token-to-expert assignment.

The families' own ``<Family>Experts.forward(hidden, top_k_index, top_k_weights)`` takes exactly K experts per token.
Expert Choice and threshold routing give a token any number of experts (0 to E), and padding the [T, K] layout with
an "absent" expert does not work outside expert parallelism (transformers' grouped and batched kernels mask such
sentinels only when ``_is_expert_parallel`` is set; eager would run them). So the routing modes run the experts
here, on the stacked weights the expert view hands out (:meth:`connito.experts.blocks.MoEBlock.stacked_params`):
``gate_up_proj`` [E, 2I, H] (gate rows first), ``down_proj`` [E, H, I], and the family's own gate function
(``experts._apply_gate``: ``act_fn(gate) * up``), so the math is the family's expert for every supported family.

Two layouts:

* :func:`experts_on_slots`: every expert takes the same number C of tokens (Expert Choice in training). One
  batched matmul over experts: ``x[token_EC]`` [E, C, H] -> [E, C, 2I] -> gate -> [E, C, I] -> [E, C, H], each row
  times its weight, summed back into the tokens. Exactly E x C expert-token products, nothing padded.
* :func:`experts_on_mask`: a boolean [T, E] assignment (a predictor's or a threshold's route): one matmul pair per
  expert over the tokens it takes, experts with no token skipped.

Both are plain autograd: the gradient reaches the experts, and through the weights the router.

Shape legend: T tokens of the forward (B x S), E routed experts, C tokens per expert, H hidden, I expert width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from connito.experts.blocks import HFMoEBlock


def check_plain_experts(block: HFMoEBlock) -> None:
    """Refuse an experts module whose layout is not the plain one this module computes (fused, untransposed
    ``gate_up_proj`` with gate rows first, no biases): a user-registered family may store experts otherwise."""
    experts = block.experts_module
    plain_flags = {"is_transposed": False, "has_bias": False, "is_concatenated": True, "has_gate": True}
    odd = {name: getattr(experts, name, plain) for name, plain in plain_flags.items()}
    odd = {name: value for name, value in odd.items() if value != plain_flags[name]}
    if odd or not hasattr(experts, "_apply_gate"):
        raise ValueError(
            f"{block.prefix}: the routing modes run experts stored as fused gate_up_proj [E, 2I, H] (gate rows first) "
            f"and down_proj [E, H, I] without biases, gated by the experts' _apply_gate; this experts module has "
            f"{odd or 'no _apply_gate'}. Train this family with its own top-k routing"
        )


def _weights(block: HFMoEBlock) -> tuple[torch.Tensor, torch.Tensor]:
    params = block.stacked_params()
    return params["gate_up_proj"], params["down_proj"]


def experts_on_slots(
    block: HFMoEBlock, hidden_TH: torch.Tensor, token_EC: torch.Tensor, weight_EC: torch.Tensor
) -> torch.Tensor:
    """[T, H]: ``sum over (e, c) of weight_EC[e, c] * expert_e(hidden_TH[token_EC[e, c]])`` into row
    ``token_EC[e, c]`` (a token taken by several experts sums their outputs; one taken by none gets 0)."""
    gate_up_EJH, down_EHI = _weights(block)
    x_ECH = hidden_TH[token_EC]
    inner_ECI = block.experts_module._apply_gate(torch.bmm(x_ECH, gate_up_EJH.transpose(1, 2)))
    y_ECH = torch.bmm(inner_ECI, down_EHI.transpose(1, 2)) * weight_EC.unsqueeze(-1).to(hidden_TH.dtype)
    out_TH = torch.zeros_like(hidden_TH)
    return out_TH.index_add(0, token_EC.reshape(-1), y_ECH.reshape(-1, hidden_TH.shape[-1]))


def experts_on_mask(
    block: HFMoEBlock, hidden_TH: torch.Tensor, mask_TE: torch.Tensor, weight_TE: torch.Tensor
) -> torch.Tensor:
    """[T, H]: ``sum over e with mask_TE[t, e] of weight_TE[t, e] * expert_e(hidden_TH[t])`` for every token t."""
    gate_up_EJH, down_EHI = _weights(block)
    out_TH = torch.zeros_like(hidden_TH)
    for expert in mask_TE.any(dim=0).nonzero().flatten().tolist():
        tokens_N = mask_TE[:, expert].nonzero().flatten()
        inner_NI = block.experts_module._apply_gate(F.linear(hidden_TH[tokens_N], gate_up_EJH[expert]))
        y_NH = F.linear(inner_NI, down_EHI[expert]) * weight_TE[tokens_N, expert].unsqueeze(-1).to(hidden_TH.dtype)
        out_TH = out_TH.index_add(0, tokens_N, y_NH)
    return out_TH
