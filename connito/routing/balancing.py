"""Load balancing for every family, on megatron-core's router utilities (no hand copies of their formulas).

transformers computes a Switch-style balance loss for most families (:mod:`connito.routing.load_balancing`) but none
for DeepSeek-V2, DeepSeek-V3 and the Residual-MoE preset. What their papers train with, computed here from the
router logits router observation captures, by megatron-core 0.16.1's
``megatron.core.transformer.moe.moe_utils`` (what Megatron trains DeepSeek-V3 with):

* :func:`expert_balance_loss`: DeepSeek-V2's expert-level balance loss (DeepSeek-V2 eq. 12-14; the Switch loss),
  ``E * sum_i f_i * P_i`` with ``f_i`` the share of the T x K top-k choices expert i got and ``P_i`` its mean score
  over the T tokens: ``compute_routing_scores_for_aux_loss`` then ``switch_load_balancing_loss_func``. (transformers'
  ``load_balancing_loss_func`` of the other families is K times this: it takes ``f_i`` as choices per token.)
* :func:`device_balance_loss`: DeepSeek-V2's device-level balance loss (DeepSeek-V2 eq. 15-17), ``sum_i f'_i P'_i``
  over D device groups of E / D contiguous experts (how expert parallelism places them: rank r holds experts
  ``[r E / D, (r + 1) E / D)``), ``f'_i`` the mean of the group's ``f_j``, ``P'_i`` the sum of its ``P_j``. That is the
  Switch loss over D "experts" whose choices and scores are the groups' sums, so it is megatron's
  ``switch_load_balancing_loss_func`` on those sums (megatron-core has no device-level loss of its own).
* :func:`sequence_balance_loss`: DeepSeek-V3's sequence-wise balance loss (DeepSeek-V3 eq. 17-20): the same loss per
  sequence, averaged over the batch's sequences, with megatron's reshaping of the batch into the expert dimension
  (``TopKRouter._apply_seq_aux_loss``). Scores are the family's: softmax (V2), sigmoid normalised per token (V3).
* :func:`router_z_loss`: the router z-loss (ST-MoE), ``z_loss_func``, for any family.
* :func:`updated_expert_bias`: DeepSeek-V3's auxiliary-loss-free bias update, ``b_i += u * sign(mean load - load_i)``
  after every step (``get_updated_expert_bias``), on the loads of the whole step summed over all ranks.

Each loss is per MoE layer with coefficient 1; :class:`connito.training.callbacks.balancing.Balancing` weighs and
averages them over the layers (as transformers' loss averages over its concatenated layers).

Shape legend: T tokens of a forward (B x S, batch-major as transformers flattens them), B sequences, S positions,
E routed experts, K experts per token.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager

import torch
import torch.distributed as dist

SCORE_FUNCTIONS = ("softmax", "sigmoid")


def _moe_utils():
    try:
        with warnings.catch_warnings():  # megatron.core warns at import that Transformer Engine and Apex are absent
            warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
            logging.getLogger("megatron").setLevel(logging.WARNING)  # and logs which FSDP it would use
            from megatron.core.transformer.moe import moe_utils
    except ImportError as error:  # pragma: no cover - megatron-core is a dependency
        raise ImportError(
            f"load balancing needs megatron-core ({error}); pip install 'megatron-core==0.16.1' (the last release "
            "for Python 3.11; 0.17+ needs Python 3.12)"
        ) from error
    return moe_utils


def _check(logits: torch.Tensor, top_k: int, score_function: str) -> None:
    if score_function not in SCORE_FUNCTIONS:
        raise ValueError(f"score_function={score_function!r}: one of {SCORE_FUNCTIONS}")
    if not 0 < top_k <= logits.shape[-1]:
        raise ValueError(f"top_k={top_k} must lie in 1..{logits.shape[-1]} (the experts of the layer)")


def _switch_loss(moe_utils, scores_TX, routing_map_TX, top_k: int, num_experts: int) -> torch.Tensor:
    """megatron's Switch loss (coefficient 1) over the T rows of ``scores_TX``; X columns: E experts, or B x E."""
    return moe_utils.switch_load_balancing_loss_func(
        probs=scores_TX,
        tokens_per_expert=routing_map_TX.sum(dim=0),
        total_num_tokens=scores_TX.shape[0],
        topk=top_k,
        num_experts=num_experts,
        moe_aux_loss_coeff=1.0,
    )


def expert_balance_loss(logits_TE: torch.Tensor, top_k: int, score_function: str = "softmax") -> torch.Tensor:
    """DeepSeek-V2's expert-level balance loss of one MoE layer (coefficient 1), over the tokens of ``logits_TE``."""
    _check(logits_TE, top_k, score_function)
    moe_utils = _moe_utils()
    num_experts = logits_TE.shape[1]
    routing_map_TE, scores_TE = moe_utils.compute_routing_scores_for_aux_loss(logits_TE, top_k, score_function)
    return _switch_loss(moe_utils, scores_TE, routing_map_TE, top_k, num_experts)


def device_balance_loss(
    logits_TE: torch.Tensor, top_k: int, num_devices: int, score_function: str = "softmax"
) -> torch.Tensor:
    """DeepSeek-V2's device-level balance loss of one MoE layer (coefficient 1): the experts split into
    ``num_devices`` contiguous groups (the expert-parallel ranks' shards)."""
    _check(logits_TE, top_k, score_function)
    tokens, num_experts = logits_TE.shape
    if num_devices < 2 or num_experts % num_devices:
        raise ValueError(
            f"num_devices={num_devices}: the device-level loss needs at least 2 device groups that split the "
            f"{num_experts} experts evenly (the expert-parallel size)"
        )
    moe_utils = _moe_utils()
    routing_map_TE, scores_TE = moe_utils.compute_routing_scores_for_aux_loss(logits_TE, top_k, score_function)
    scores_TD = scores_TE.reshape(tokens, num_devices, -1).sum(-1)
    choices_TD = routing_map_TE.reshape(tokens, num_devices, -1).sum(-1)
    return _switch_loss(moe_utils, scores_TD, choices_TD, top_k, num_devices)


def sequence_balance_loss(logits_BSE: torch.Tensor, top_k: int, score_function: str = "sigmoid") -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss of one MoE layer (coefficient 1): the balance loss of each of the B
    sequences over its S tokens, averaged over the sequences."""
    _check(logits_BSE, top_k, score_function)
    if logits_BSE.dim() != 3:
        raise ValueError(f"logits_BSE must be [B, S, E], got shape {tuple(logits_BSE.shape)}")
    moe_utils = _moe_utils()
    batch, seq, num_experts = logits_BSE.shape
    # megatron's layout is sequence-major [S, B]: its reshape [S * B, E] -> [S, B * E] puts each sequence's experts
    # in their own columns, so one Switch loss over S tokens sums the per-sequence losses
    logits_TE = logits_BSE.transpose(0, 1).reshape(seq * batch, num_experts)
    routing_map_TE, scores_TE = moe_utils.compute_routing_scores_for_aux_loss(logits_TE, top_k, score_function)
    scores_SX = scores_TE.reshape(seq, batch * num_experts)
    routing_map_SX = routing_map_TE.reshape(seq, batch * num_experts)
    return _switch_loss(moe_utils, scores_SX, routing_map_SX, top_k, num_experts) / batch


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """The router z-loss of one MoE layer (coefficient 1): the mean squared logsumexp of the logits."""
    return _moe_utils().z_loss_func(logits_TE, 1.0)


@contextmanager
def _megatron_reduce_group(group):
    """megatron's bias update all-reduces the loads over its tensor-and-data-parallel group (a global of
    ``parallel_state``, set by ``initialize_model_parallel``). Connito runs no Megatron parallel state: point that
    global at ``group`` for the call (every rank of the run: each routes its own tokens, also under expert
    parallelism)."""
    from megatron.core import parallel_state

    name = "_TENSOR_AND_DATA_PARALLEL_GROUP_WITH_CP"
    saved = getattr(parallel_state, name)
    setattr(parallel_state, name, group)
    try:
        yield
    finally:
        setattr(parallel_state, name, saved)


def updated_expert_bias(
    tokens_per_expert_E: torch.Tensor, bias_E: torch.Tensor, rate: float, group=None
) -> torch.Tensor:
    """DeepSeek-V3's bias after one step: the loads ``tokens_per_expert_E`` (this rank's; summed over ``group``, every
    rank by default, in place) against their mean, ``bias + rate * sign(mean - load)``. A collective: it needs
    ``torch.distributed`` initialised (Connito's trainer always is, one process included)."""
    moe_utils = _moe_utils()
    if not dist.is_initialized():
        raise RuntimeError(
            "updated_expert_bias sums the loads over the ranks: initialise torch.distributed first (a one-process "
            "gloo group will do)"
        )
    with _megatron_reduce_group(group if group is not None else dist.group.WORLD):
        return moe_utils.get_updated_expert_bias(tokens_per_expert_E, bias_E, rate)
