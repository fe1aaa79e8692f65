"""The heterogeneity-aware balance loss of FFT-MoE's adapter routers, and the per-expert token counts of a client.

**Which formula.** The paper (Hu et al. 2025, arXiv 2508.18663) adds a "heterogeneity-aware auxiliary loss" that
regularises each client's routing towards balanced use of the experts its budget lets it activate. Its exact equation
was not available to us when this was written; this is the most faithful version we could define, and it is ours,
not a transcription. For a client with budget ``k`` (experts per token), one adapter layer with M experts and router
probabilities ``p_tm`` over the micro-batch's T tokens::

    f_m = 1/(T*k) * sum_t 1[m in TopK_k(p_t)]      (share of the client's k*T expert slots that went to m)
    P_m = 1/T     * sum_t p_tm                      (mean router probability of m)
    L   = M * sum_m f_m * P_m

and the term is the mean of ``L`` over the adapter layers. Normalising the load by the budget (``T*k``, so that
``sum_m f_m = 1`` whatever ``k``) makes perfectly balanced routing cost exactly 1 for a client of every budget: a
budget-1 and a budget-8 client pull their routers toward balance with the same strength, and their loss values are
comparable in the server's logs. With ``k = 1`` it is Switch Transformer's load-balancing loss. ``f`` carries no
gradient (a count); ``P`` does.

Legend: T tokens, M adapter experts, K the budget.
"""

from __future__ import annotations

import torch

from connito.composition.fft_moe.adapters import SparseMoEAdapter


def budget_balance_loss(logits_TM: torch.Tensor, top_k: int) -> torch.Tensor:
    """``M * sum_m f_m P_m`` with the load ``f`` normalised by the budget (see the module docstring)."""
    num_tokens, num_experts = logits_TM.shape
    probs_TM = torch.softmax(logits_TM.float(), dim=-1)
    ids_TK = torch.topk(probs_TM, top_k, dim=-1).indices
    load_M = torch.bincount(ids_TK.reshape(-1), minlength=num_experts).to(probs_TM.dtype) / (num_tokens * top_k)
    return num_experts * (load_M * probs_TM.mean(dim=0)).sum()


class AdapterRouting:
    """The router logits of the model's last forward, per adapter layer (hooks on the routers; the forward's
    signature is untouched), and the tokens each adapter expert was routed in training since the last ``reset``."""

    def __init__(self, model: torch.nn.Module, adapters: dict[int, SparseMoEAdapter]):
        self.model, self.adapters = model, adapters
        self.logits: dict[int, torch.Tensor] = {}
        self.tokens_LM = torch.zeros(len(adapters), next(iter(adapters.values())).router.out_features)
        self.order = {layer: row for row, layer in enumerate(sorted(adapters))}
        self._handles = [model.register_forward_pre_hook(self._start)]
        for layer, adapter in adapters.items():
            self._handles.append(adapter.router.register_forward_hook(self._recorder(layer, adapter.top_k)))

    def _start(self, module, args) -> None:
        self.logits.clear()

    def _recorder(self, layer: int, top_k: int):
        def record(module, args, logits_TM):
            self.logits[layer] = logits_TM
            if self.model.training and torch.is_grad_enabled():
                ids = torch.topk(logits_TM.detach(), top_k, dim=-1).indices.reshape(-1)
                counts = torch.bincount(ids, minlength=logits_TM.shape[-1]).to(self.tokens_LM)
                self.tokens_LM[self.order[layer]] += counts.cpu()

        return record

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
