"""FFT-MoE's sparse MoE adapters (Hu et al. 2025, arXiv 2508.18663): M small experts and a router beside a frozen FFN.

Per chosen decoder layer ``l`` the adapter sits beside the layer's FFN (its ``mlp`` module, dense MLP or MoE block)
and its output is added to the FFN's::

    y_TH = mlp(x_TH) + sum_{m in topk_k(p_t)} w_tm * up_m(act(down_m(x_TH)))
    p_TM = softmax(x_TH @ router^T),   w_tm = p_tm / sum_{j in topk_k(p_t)} p_tj

with ``down_m`` H -> r, ``up_m`` r -> H (no biases) and ``k`` the client's budget (experts it routes each token to).
The modules themselves are defined in the standalone modeling file of the exported checkpoints
(:mod:`connito.models.custom.modeling_connito_fft_moe`). Every ``up_m`` starts at zero, so a freshly installed
adapter adds exactly ``0.0`` and the model computes the base's logits bit for bit (the round-0 global model of the
paper).

Parameter names (what delta packages and the server's aggregation address): the adapter is the decoder layer's
``mlp_adapter`` attribute, so on a causal LM ``model.layers.<l>.mlp_adapter.router.weight`` [M, H],
``model.layers.<l>.mlp_adapter.experts.<m>.down.weight`` [r, H] and ``...experts.<m>.up.weight`` [H, r]. The FFN's
own names do not change: the base's state dict loads as before. The adapter joins the FFN's output through a forward
hook on ``mlp`` (the FFN module itself is not wrapped or edited).

Legend: T tokens, H hidden size, M adapter experts, r bottleneck width, K the budget (top-k).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

# one definition of the adapter, in the standalone modeling file an exported checkpoint carries (layer 1)
from connito.models.custom.modeling_connito_fft_moe import (
    ACTIVATIONS,
    ADAPTER_ATTR,
    AdapterExpert,
    SparseMoEAdapter,
    add_adapter_output,
)

__all__ = ["ADAPTER_ATTR", "AdapterExpert", "AdapterSpec", "SparseMoEAdapter", "install_adapters"]


class AdapterError(ValueError):
    """Adapters that cannot be installed or loaded as asked; the message names the fix."""


@dataclass(frozen=True)
class AdapterSpec:
    """The shape of one model's adapters; the same on every client and the server (their packages must match)."""

    num_experts: int = 8
    """M, adapter experts per chosen FFN."""
    width: int = 16
    """r, the bottleneck width of each expert (down H -> r, up r -> H)."""
    activation: str = "gelu"
    layers: tuple[int, ...] | None = None
    """Decoder layers that get an adapter; None: every layer."""

    def __post_init__(self):
        if self.num_experts < 1:
            raise AdapterError(f"adapter num_experts={self.num_experts} must be >= 1")
        if self.width < 1:
            raise AdapterError(f"adapter width={self.width} must be >= 1 (the bottleneck r of down H->r, up r->H)")
        if self.layers is not None and not self.layers:
            raise AdapterError("adapter layers=[] puts no adapter anywhere; name decoder layers, or null for every one")
        if self.activation not in ACTIVATIONS:
            raise AdapterError(f"adapter activation='{self.activation}' is not one of {sorted(ACTIVATIONS)}")

    def check_budget(self, top_k: int) -> None:
        if not 1 <= top_k <= self.num_experts:
            raise AdapterError(
                f"a client's budget top_k={top_k} must be between 1 and the adapter's num_experts={self.num_experts}"
            )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a transformers causal LM (``model.model.layers``)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise AdapterError(f"{type(model).__name__} has no decoder layers at model.layers; FFT-MoE adapters need them")
    return layers


def install_adapters(model: nn.Module, spec: AdapterSpec, top_k: int) -> dict[int, SparseMoEAdapter]:
    """Put one adapter beside the ``mlp`` of every layer ``spec.layers`` names; returns them by layer index."""
    spec.check_budget(top_k)
    layers = decoder_layers(model)
    chosen = range(len(layers)) if spec.layers is None else spec.layers
    bad = [index for index in chosen if not 0 <= index < len(layers)]
    if bad:
        raise AdapterError(f"adapter layers {bad} are not decoder layers of this model (it has {len(layers)})")
    hidden = model.config.hidden_size
    installed = {}
    for index in chosen:
        layer = layers[index]
        if not isinstance(getattr(layer, "mlp", None), nn.Module):
            raise AdapterError(f"decoder layer {index} ({type(layer).__name__}) has no FFN at .mlp to adapt")
        if hasattr(layer, ADAPTER_ATTR):
            raise AdapterError(f"decoder layer {index} already has an adapter; install adapters once per model")
        param = next(layer.mlp.parameters())
        adapter = SparseMoEAdapter(hidden, spec.num_experts, spec.width, spec.activation, top_k)
        adapter = adapter.to(device=param.device, dtype=param.dtype)
        layer.add_module(ADAPTER_ATTR, adapter)
        layer.mlp.register_forward_hook(add_adapter_output(adapter))
        installed[index] = adapter
    return installed


def is_adapter_name(name: str) -> bool:
    return f".{ADAPTER_ATTR}." in f".{name}"


def freeze_base(model: nn.Module) -> tuple[int, int]:
    """``requires_grad=False`` on every parameter that is not an adapter's (no gradient, no optimizer state: the
    base stays bit-identical). Returns (trainable, total) element counts."""
    trainable = total = 0
    for name, param in model.named_parameters():
        keep = is_adapter_name(name)
        param.requires_grad_(keep)
        trainable += param.numel() if keep else 0
        total += param.numel()
    return trainable, total


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors by their model names (detached copies on CPU)."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if is_adapter_name(n)}


def load_adapter_state(model: nn.Module, tensors: dict[str, torch.Tensor], names: Sequence[str] | None = None) -> None:
    """Copy ``tensors`` into the installed adapters; every adapter tensor of the model must be given, shaped alike
    (``names`` limits the check to those names, e.g. the experts alone without the routers)."""
    params = {n: p for n, p in model.named_parameters() if is_adapter_name(n)}
    wanted = set(params if names is None else names)
    missing, extra = sorted(wanted - set(tensors)), sorted(set(tensors) - set(params))
    if missing or extra:
        raise AdapterError(
            f"adapter tensors do not match the installed adapters: missing {missing[:4]}, unknown {extra[:4]}; install "
            "adapters with the spec (num_experts, width, layers) the tensors were written with"
        )
    with torch.no_grad():
        for name in wanted:
            if tensors[name].shape != params[name].shape:
                raise AdapterError(
                    f"adapter tensor {name} is {tuple(tensors[name].shape)}, the model's {tuple(params[name].shape)}"
                )
            params[name].copy_(tensors[name])
