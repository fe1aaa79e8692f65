"""Mean hidden state entering each decoder layer's feed-forward block: a data set's embedding in router space.

A router row scores a token by ``hidden @ row``, where ``hidden`` is what enters the layer's feed-forward block:
the post-attention-norm output in the pre-norm families (Llama, Qwen, Mixtral, OLMoE, DeepSeek), the residual
stream itself in OLMo2 and FlexOlmo (they normalise after the block). Either way it is what the router sees. The
mean of that hidden state over a data set's tokens is therefore a natural router row for an expert trained on that
data, an offline initialisation of BTX's ``router_init`` and FlexOLMo's router rows (FlexOLMo itself embeds the data
with an external embedder; see :mod:`connito.composition.flexolmo`)::

    public_LH = mean_ffn_inputs(public_model, public_batches)
    owner_LH = mean_ffn_inputs(public_model, owner_batches)
    owner_start("public", "owner", router_rows=torch.stack([public_LH, owner_LH], dim=1))  # [L, 2, H]

:func:`mean_ffn_inputs` hooks each decoder layer's ``mlp`` module (a forward pre-hook: it reads the input, changes
nothing), runs the model's base (no lm_head) under ``torch.no_grad()`` in eval mode (the caller's mode is restored
after) and averages over every token position, or over the positions an ``attention_mask`` marks as real tokens.
Sums are float64 and the mean is the total over all batches divided by the total token count (a batch counts by
its tokens, not once), returned as float32 on the CPU.

Shape legend: L decoder layers, H hidden size, B batch rows, S sequence positions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from connito.experts.view import decoder_layers
from connito.models.families import ModelError

Batch = Mapping[str, torch.Tensor] | torch.Tensor
"""A dict with ``input_ids`` [B, S] (and optionally ``attention_mask`` [B, S]; other keys are ignored), or a bare
LongTensor of ids ([B, S] or [S])."""


def _ids_and_mask(batch: Batch, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        ids, mask = batch, None
    elif isinstance(batch, Mapping) and "input_ids" in batch:
        ids, mask = batch["input_ids"], batch.get("attention_mask")
    else:
        raise ModelError(
            f"batch {index} is a {type(batch).__name__}; expected a LongTensor of token ids or a dict with "
            "'input_ids' (and optionally 'attention_mask')"
        )
    ids = torch.as_tensor(ids)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.is_floating_point():
        raise ModelError(f"batch {index}: input_ids must be integer [B, S] (or [S]), got {ids.dtype} {list(ids.shape)}")
    if mask is not None:
        mask = torch.as_tensor(mask)
        mask = mask.unsqueeze(0) if mask.dim() == 1 else mask
        if tuple(mask.shape) != tuple(ids.shape):
            raise ModelError(f"batch {index}: attention_mask has shape {list(mask.shape)}, input_ids {list(ids.shape)}")
    return ids, mask


def mean_ffn_inputs(model: nn.Module, batches: Iterable[Batch]) -> torch.Tensor:
    """[L, H] float32: per decoder layer, the mean over the (non-padding) token positions of ``batches`` of the
    hidden state entering the layer's ``mlp`` (its feed-forward block or MoE router); see the module docstring."""
    layers = decoder_layers(model)
    missing = [i for i, layer in enumerate(layers) if not isinstance(getattr(layer, "mlp", None), nn.Module)]
    if missing:
        raise ModelError(
            f"decoder layers {missing} of {type(model).__name__} have no 'mlp' module: the feed-forward input of "
            "this family is not where mean_ffn_inputs hooks"
        )
    sums_LH: list[torch.Tensor | None] = [None] * len(layers)
    keep: dict[str, torch.Tensor | None] = {"BS": None}

    def hook_for(index: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            hidden_NH = hidden.reshape(-1, hidden.shape[-1]).to(torch.float64)
            if keep["BS"] is not None:
                hidden_NH = hidden_NH[keep["BS"].reshape(-1).to(hidden.device)]
            total = hidden_NH.sum(dim=0).cpu()
            sums_LH[index] = total if sums_LH[index] is None else sums_LH[index] + total

        return hook

    base = getattr(model, "base_model", model)
    device = next(model.parameters()).device
    handles = [layer.mlp.register_forward_pre_hook(hook_for(i), with_kwargs=True) for i, layer in enumerate(layers)]
    was_training = model.training
    count = 0
    model.eval()
    try:
        with torch.no_grad():
            for index, batch in enumerate(batches):
                ids, mask = _ids_and_mask(batch, index)
                keep["BS"] = None if mask is None else mask.to(torch.bool)
                count += ids.numel() if mask is None else int(keep["BS"].sum())
                kwargs = {"input_ids": ids.to(device), "use_cache": False}
                if mask is not None:
                    kwargs["attention_mask"] = mask.to(device)
                base(**kwargs)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if count == 0:
        raise ModelError("mean_ffn_inputs: the batches held no token (or every position was padding)")
    if any(s is None for s in sums_LH):
        raise ModelError(
            f"mean_ffn_inputs: the 'mlp' of layers {[i for i, s in enumerate(sums_LH) if s is None]} never ran"
        )
    return (torch.stack(sums_LH) / count).to(torch.float32)
