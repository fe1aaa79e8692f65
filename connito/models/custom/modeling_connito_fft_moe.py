"""FFT-MoE models (Hu et al. 2025, arXiv 2508.18663): a frozen base causal LM with a sparse MoE adapter beside the FFN
of chosen decoder layers. Standalone (torch and transformers only): Connito imports it natively, and
``save_pretrained`` copies this file and its relative import (``wrapped_base.py``) into the checkpoint with
``config.auto_map``, so ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` builds the same
model in any process.

Layout (``model_type = connito_fft_moe``): ``base`` is the base's own ``<Family>ForCausalLM``; decoder layer ``l``
with an adapter holds it as ``base.model.layers.<l>.mlp_adapter`` (``router.weight`` [M, H],
``experts.<m>.down.weight`` [r, H], ``experts.<m>.up.weight`` [H, r]). The adapter's output is added to the FFN's
(``mlp``) output through a forward hook on ``mlp``::

    y = mlp(x) + sum_{m in topk_k(p)} (p_m / sum_topk p) * up_m(act(down_m(x))),   p = softmax(router(x))

``top_k`` is the client's budget. :class:`SparseMoEAdapter` is the one definition Connito trains with too
(:mod:`connito.composition.fft_moe.adapters`). Legend: T tokens, H hidden, M adapter experts, r width, K budget.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PretrainedConfig

from .wrapped_base import WrappedBaseModel, base_config_of

ADAPTER_ATTR = "mlp_adapter"
ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}


class AdapterExpert(nn.Module):
    """One two-layer bottleneck MLP: ``up(act(down(x)))``; ``up`` starts at zero."""

    def __init__(self, hidden: int, width: int, activation: str):
        super().__init__()
        self.down = nn.Linear(hidden, width, bias=False)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(width, hidden, bias=False)
        nn.init.zeros_(self.up.weight)
        self.up.zero_init = True  # kept at zero by WrappedBaseModel._init_weights too

    def forward(self, x_TH: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x_TH)))


class SparseMoEAdapter(nn.Module):
    """M adapter experts and a softmax top-k router; ``top_k`` (the budget) is a plain attribute, not a tensor."""

    def __init__(self, hidden: int, num_experts: int, width: int, activation: str, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(hidden, num_experts, bias=False)
        nn.init.normal_(self.router.weight, std=hidden**-0.5)
        self.experts = nn.ModuleList(AdapterExpert(hidden, width, activation) for _ in range(num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_TH = x.reshape(-1, x.shape[-1])
        probs_TM = torch.softmax(self.router(x_TH).float(), dim=-1)
        weights_TK, ids_TK = torch.topk(probs_TM, self.top_k, dim=-1)
        weights_TK = (weights_TK / weights_TK.sum(dim=-1, keepdim=True)).to(x.dtype)
        out_TH = torch.zeros_like(x_TH)
        for m in ids_TK.unique().tolist():  # only the experts some token chose run (and get a gradient)
            token_T, slot_T = torch.nonzero(ids_TK == m, as_tuple=True)
            out_TH = out_TH.index_add(0, token_T, weights_TK[token_T, slot_T, None] * self.experts[m](x_TH[token_T]))
        return out_TH.reshape(x.shape)


def add_adapter_output(adapter: SparseMoEAdapter):
    """The forward hook on an FFN that adds ``adapter``'s output to the FFN's."""

    def hook(module, args, output):
        if isinstance(output, tuple):  # an FFN returning (hidden, router logits): the adapter joins the hidden states
            return (output[0] + adapter(args[0]), *output[1:])
        return output + adapter(args[0])

    return hook


class ConnitoFftMoeConfig(PretrainedConfig):
    model_type = "connito_fft_moe"

    def __init__(
        self,
        base_config: dict | None = None,
        adapter_num_experts: int = 8,
        adapter_width: int = 16,
        adapter_activation: str = "gelu",
        adapter_layers: list[int] | None = None,
        adapter_top_k: int = 1,
        **kwargs,
    ):
        self.base_config = dict(base_config or {})
        self.adapter_num_experts = int(adapter_num_experts)
        self.adapter_width = int(adapter_width)
        self.adapter_activation = adapter_activation
        self.adapter_layers = None if adapter_layers is None else [int(i) for i in adapter_layers]
        self.adapter_top_k = int(adapter_top_k)
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "initializer_range"):
            if key in self.base_config:
                kwargs.setdefault(key, self.base_config[key])
        kwargs["tie_word_embeddings"] = False  # the base ties its own embeddings if its family does
        super().__init__(**kwargs)


class ConnitoFftMoeForCausalLM(WrappedBaseModel, GenerationMixin):
    config_class = ConnitoFftMoeConfig
    base_model_prefix = "base"

    def __init__(self, config: ConnitoFftMoeConfig):
        super().__init__(config)
        self.base = AutoModelForCausalLM.from_config(base_config_of(config))
        layers = self.base.model.layers
        chosen = range(len(layers)) if config.adapter_layers is None else config.adapter_layers
        for index in chosen:
            adapter = SparseMoEAdapter(config.hidden_size, config.adapter_num_experts, config.adapter_width,
                                       config.adapter_activation, config.adapter_top_k)  # fmt: skip
            layers[index].add_module(ADAPTER_ATTR, adapter)
            layers[index].mlp.register_forward_hook(add_adapter_output(adapter))
        self.post_init()

    def forward(self, *args, **kwargs):
        return self.base(*args, **kwargs)


ConnitoFftMoeConfig._auto_class = "AutoConfig"
ConnitoFftMoeForCausalLM._auto_class = "AutoModelForCausalLM"
