"""FFT-MoE's sparse MoE adapters (Hu et al. 2025, arXiv 2508.18663): M small experts and a router beside a frozen FFN.

Per chosen decoder layer ``l`` the adapter sits beside the layer's FFN (its ``mlp`` module, dense MLP or MoE block)
and its output is added to the FFN's::

    y_TH = mlp(x_TH) + sum_{m in topk_k(p_t)} w_tm * up_m(act(down_m(x_TH)))
    p_TM = softmax(x_TH @ router^T),   w_tm = p_tm / sum_{j in topk_k(p_t)} p_tj

with ``down_m`` H -> r, ``up_m`` r -> H (no biases) and ``k`` the client's budget (experts it routes each token to).
Every ``up_m`` starts at zero, so a freshly installed adapter adds exactly ``0.0`` and the model computes the base's
logits bit for bit (the round-0 global model of the paper).

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

ADAPTER_ATTR = "mlp_adapter"
ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}


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
        if self.activation not in ACTIVATIONS:
            raise AdapterError(f"adapter activation='{self.activation}' is not one of {sorted(ACTIVATIONS)}")

    def check_budget(self, top_k: int) -> None:
        if not 1 <= top_k <= self.num_experts:
            raise AdapterError(
                f"a client's budget top_k={top_k} must be between 1 and the adapter's num_experts={self.num_experts}"
            )


class AdapterExpert(nn.Module):
    """One two-layer bottleneck MLP: ``up(act(down(x)))``; ``up`` starts at zero."""

    def __init__(self, hidden: int, width: int, activation: str):
        super().__init__()
        self.down = nn.Linear(hidden, width, bias=False)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(width, hidden, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, x_TH: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x_TH)))


class SparseMoEAdapter(nn.Module):
    """M adapter experts and a softmax top-k router; ``top_k`` is the client's budget (a plain attribute, not a
    parameter: the same global experts serve clients of every budget)."""

    def __init__(self, hidden: int, spec: AdapterSpec, top_k: int):
        super().__init__()
        spec.check_budget(top_k)
        self.top_k = top_k
        self.router = nn.Linear(hidden, spec.num_experts, bias=False)
        nn.init.normal_(self.router.weight, std=hidden**-0.5)
        self.experts = nn.ModuleList(
            AdapterExpert(hidden, spec.width, spec.activation) for _ in range(spec.num_experts)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_TH = x.reshape(-1, x.shape[-1])
        logits_TM = self.router(x_TH)
        probs_TM = torch.softmax(logits_TM.float(), dim=-1)
        weights_TK, ids_TK = torch.topk(probs_TM, self.top_k, dim=-1)
        weights_TK = (weights_TK / weights_TK.sum(dim=-1, keepdim=True)).to(x.dtype)
        out_TH = torch.zeros_like(x_TH)
        for m in ids_TK.unique().tolist():  # only the experts some token chose run (and get a gradient)
            token_T, slot_T = torch.nonzero(ids_TK == m, as_tuple=True)
            out_TH = out_TH.index_add(0, token_T, weights_TK[token_T, slot_T, None] * self.experts[m](x_TH[token_T]))
        return out_TH.reshape(x.shape)


def _add_adapter_output(adapter: SparseMoEAdapter):
    def hook(module, args, output):
        if isinstance(output, tuple):  # an FFN returning (hidden, router logits): the adapter joins the hidden states
            return (output[0] + adapter(args[0]), *output[1:])
        return output + adapter(args[0])

    return hook


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
        adapter = SparseMoEAdapter(hidden, spec, top_k).to(device=param.device, dtype=param.dtype)
        layer.add_module(ADAPTER_ATTR, adapter)
        layer.mlp.register_forward_hook(_add_adapter_output(adapter))
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
