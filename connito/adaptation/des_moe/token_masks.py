"""Per-token gradient masks: an expert learns only from the tokens its domains allow.

DES-MoE masks gradients so that a domain's tokens update only that domain's experts. Connito does it per token, so
packed rows mixing domains (each token keeps its domain label) need no single-domain batches: in every MoE block,
each routed (token, expert) pair is *allowed* when the expert-domain map lets the token's domain use that expert,
and *disallowed* otherwise (also when the token has no active domain). The block's output is unchanged, and so are
the gradients reaching the hidden states and the routing weights; only the experts' parameters see the difference::

    y_t = sum_{k allowed}  w_tk * f_{e_tk}(h_t; W_e)  +  sum_{k disallowed}  w_tk * f_{e_tk}(h_t; W_e.detach())

so ``dL/dW_e`` is the sum over the tokens routed to e that its map row allows, exactly what a model that could zero
the disallowed tokens' contribution to W_e would compute, while every other gradient is the unmasked one.

How it plugs in (transformers blocks, ``parallel.ep_size=1``): a forward pre-hook and a forward hook on each block's
experts module (``<Family>Experts``, called as ``experts(hidden_TH, ids_TK, weights_TK)``). The pre-hook splits the
pairs and hands the experts only the allowed ones, one pair per row (``hidden[t]``, ``[[e]]``, ``[[w]]``), so the
family's own experts implementation (eager, grouped_mm, ...) computes them with the live parameters; the forward
hook computes the disallowed pairs the same way through :func:`torch.func.functional_call` with detached copies of
the parameters, and scatters both back to the block's [T, H] output. A forward where every pair is allowed (or no
map is set, or autograd is off: evaluation) runs the unchanged fused call.

Expert parallelism is refused: AutoEP's layer permutes tokens to their experts' ranks and runs each rank's experts
in one fused call behind an all-to-all, with no seam at which some pairs could use detached parameters; the
per-token split would have to live inside DeepSpeed's layer.

Shape legend: T tokens of the forward (B x S), H hidden size, E routed experts, K experts per token, D domains,
N pairs (token, expert) of one kind.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from connito.experts import ExpertView
from connito.experts.blocks import HFMoEBlock

NAMES = ("hidden_states", "top_k_index", "top_k_weights")


@dataclass
class _Split:
    num_tokens: int
    hidden_TH: torch.Tensor
    allowed_N: torch.Tensor
    """Token index of each allowed pair."""
    disallowed_N: torch.Tensor
    ids_N1: torch.Tensor
    weights_N1: torch.Tensor


class TokenGradientMasks:
    """The hooks on every MoE block of ``model``; :meth:`set_allowed` and :meth:`set_domains` feed them."""

    def __init__(self, model: nn.Module, view: ExpertView | None = None):
        self.view = view or ExpertView(model)
        self._allowed: dict[int, torch.Tensor] | None = None
        self._domains_T: torch.Tensor | None = None
        self._pending: dict[int, _Split] = {}
        self._bypass = False
        self._handles = []
        for layer, block in self.view.blocks():
            if not isinstance(block, HFMoEBlock):
                raise ValueError(
                    f"per-token gradient masks need transformers MoE blocks; layer {layer} is an expert-parallel "
                    "AutoEP layer, whose fused all-to-all experts call has no seam for detached parameters. Use "
                    "parallel.ep_size=1 (ZeRO 1/2 spreads optimizer memory over the data-parallel ranks)"
                )
            experts = block.experts_module
            self._handles.append(experts.register_forward_pre_hook(self._pre_hook(layer), with_kwargs=True))
            self._handles.append(experts.register_forward_hook(self._post_hook(), with_kwargs=True))

    def set_allowed(self, allowed_DLE: torch.Tensor | None) -> None:
        """``allowed_DLE`` bool [D, L, E] (L in ``view.moe_layers`` order): domain d's tokens may train expert e of
        MoE layer l. None: no masking."""
        if allowed_DLE is None:
            self._allowed = None
            return
        num_layers = len(self.view.moe_layers)
        if allowed_DLE.dim() != 3 or tuple(allowed_DLE.shape[1:]) != (num_layers, self.view.num_experts):
            raise ValueError(
                f"allowed experts of shape {tuple(allowed_DLE.shape)}; expected [domains, {num_layers}, "
                f"{self.view.num_experts}]"
            )
        # Row D (the last) is for tokens without an active domain (-1): no expert allows them.
        table_DLE = torch.cat([allowed_DLE.bool(), torch.zeros_like(allowed_DLE[:1], dtype=torch.bool)])
        self._allowed = {layer: table_DLE[:, i].contiguous() for i, layer in enumerate(self.view.moe_layers)}

    def set_domains(self, domains_T: torch.Tensor | None) -> None:
        """The domain of every token of the next forwards (int [T], B x S flattened; -1: none)."""
        self._domains_T = None if domains_T is None else domains_T.reshape(-1)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # -- hooks -----------------------------------------------------------------------------------------------------
    def _pre_hook(self, layer: int):
        def hook(module, args, kwargs):
            if self._bypass or self._allowed is None or self._domains_T is None or not torch.is_grad_enabled():
                return None
            hidden_TH, ids_TK, weights_TK = _arguments(args, kwargs)
            domains_T = self._domains_T
            if domains_T.shape[0] != hidden_TH.shape[0]:
                raise ValueError(
                    f"layer {layer} routes {hidden_TH.shape[0]} tokens but the micro-batch has {domains_T.shape[0]} "
                    "domain ids: set the domains of every forward (B x S flattened)"
                )
            table_DE = self._allowed[layer]
            if table_DE.device != ids_TK.device:  # moved once per map, not once per forward
                table_DE = self._allowed[layer] = table_DE.to(ids_TK.device)
            num_domains = table_DE.shape[0] - 1
            rows_T = torch.where(domains_T >= 0, domains_T, num_domains).to(ids_TK.device)
            allowed_TK = table_DE[rows_T[:, None], ids_TK]
            if bool(allowed_TK.all()):
                return None
            order_N2 = torch.cat([allowed_TK.nonzero(), (~allowed_TK).nonzero()])
            tokens_N, slots_N = order_N2[:, 0], order_N2[:, 1]
            num_allowed = int(allowed_TK.sum())
            self._pending[id(module)] = _Split(
                hidden_TH.shape[0],
                hidden_TH,
                tokens_N[:num_allowed],
                tokens_N[num_allowed:],
                ids_TK[tokens_N, slots_N][:, None],
                weights_TK[tokens_N, slots_N][:, None],
            )
            pairs = slice(0, num_allowed)
            split = self._pending[id(module)]
            return (hidden_TH[split.allowed_N], split.ids_N1[pairs], split.weights_N1[pairs]), {}

        return hook

    def _post_hook(self):
        def hook(module, args, kwargs, output):
            split = self._pending.pop(id(module), None)
            if split is None or self._bypass:
                return None
            out_TH = output.new_zeros(split.num_tokens, output.shape[-1]).index_add(0, split.allowed_N, output)
            if split.disallowed_N.numel():
                pairs = slice(split.allowed_N.numel(), None)
                detached = {name: param.detach() for name, param in module.named_parameters()}
                self._bypass = True
                try:
                    frozen_out = torch.func.functional_call(
                        module,
                        detached,
                        (split.hidden_TH[split.disallowed_N], split.ids_N1[pairs], split.weights_N1[pairs]),
                    )
                finally:
                    self._bypass = False
                out_TH = out_TH.index_add(0, split.disallowed_N, frozen_out.to(out_TH.dtype))
            return out_TH

        return hook


def _arguments(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    values = list(args) + [kwargs[name] for name in NAMES[len(args) :] if name in kwargs]
    if len(values) != 3:
        raise ValueError(
            f"an experts module was called with {len(args)} positional and {sorted(kwargs)} keyword arguments; "
            f"per-token masks expect ({', '.join(NAMES)})"
        )
    return values[0], values[1], values[2]
