"""Streaming routing statistics per domain x MoE layer x expert: counts aggregated while data streams.

A :class:`RoutingStatistics` subscribes to a :class:`~connito.routing.RouterObserver` and folds every routing
record into a handful of float64 CPU tensors; no record is kept. The caller says which domain each token of the
next forward belongs to::

    stats = RoutingStatistics(view, num_domains=4, domain_names=("code", "docs", "prose", "wiki"))
    subscription = stats.attach(observer)
    for input_ids_BS, domain_ids_BS in batches:
        stats.set_domains(domain_ids_BS.reshape(-1))   # one id per token, B x S flattened; -1: ignore the token
        model(input_ids=input_ids_BS)
    subscription.remove()
    stats.all_reduce_()                                 # every rank now holds the global counts

What is accumulated, per forward and MoE layer, over the tokens whose domain is not -1:

* ``tokens_D``: tokens seen per domain (counted once per forward, at the first MoE layer);
* ``gate_sum_DLE``: the sum over the domain's tokens of each expert's router score (:func:`router_scores`: softmax
  of the logits; sigmoid-scored families normalised per token);
* ``selected_DLE``: how many of the domain's tokens had the expert among their top-k;
* ``weight_sum_DLE``: the sum of the top-k weights the expert's output was scaled by;
* ``top1_DLE``: how many of the domain's tokens had the expert as top-1 (the first id with the largest weight);
* ``coactivation_LEE``: over all domains, how many tokens had both experts i and j in their top-k (the diagonal
  is ``selected`` summed over domains).

Every tensor is a sum over tokens, so instances add up: :meth:`RoutingStatistics.merge_` adds another instance,
:meth:`RoutingStatistics.all_reduce_` sums over the ranks of a process group. Counts are whole numbers held in
float64 (exact up to 2**53 tokens). Derived quantities (ESFT scores, concentration, domain specialisation,
co-activation, overlap of top-k sets) are pure functions of these counts: :mod:`connito.analysis.summaries`.

Shape legend: D domains, L MoE layers (index i is ``view.moe_layers[i]``; dense layers left out), E routed experts
per MoE layer, K experts per token, T tokens of one forward (B x S).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from connito.analysis.ranks import sum_over_ranks_
from connito.experts import ExpertView
from connito.models.families import get_family
from connito.routing import RouterObserver, RoutingRecord, Subscription

_INTEGER_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)
COUNTS = ("tokens_D", "gate_sum_DLE", "selected_DLE", "weight_sum_DLE", "top1_DLE", "coactivation_LEE")


def router_scores(family_name: str, logits_TE: torch.Tensor) -> torch.Tensor:
    """The router's score distribution over experts per token, ``probs_TE`` in float64 (each row sums to 1).

    Softmax families: ``softmax(logits)``, the probabilities the router draws its top-k from. Sigmoid-scored
    families (``Family.router_scoring == "sigmoid"``: DeepSeek-V3): ``sigmoid(logits)`` divided by its sum over
    experts per token, so that ESFT's average gate score is a share of the layer's gate mass for these families
    too. The choice bias (DeepSeek-V3's ``e_score_correction_bias``) only picks experts, it is no part of the
    score.
    """
    logits_TE = logits_TE.detach().to("cpu", torch.float64)
    if get_family(family_name).router_scoring == "sigmoid":
        scores_TE = logits_TE.sigmoid()
        return scores_TE / scores_TE.sum(dim=-1, keepdim=True)
    return logits_TE.softmax(dim=-1)


class RoutingStatistics:
    """Routing counts per domain x MoE layer x expert over every forward observed since construction."""

    def __init__(self, view: ExpertView, num_domains: int, domain_names: Sequence[str] | None = None):
        if num_domains < 1:
            raise ValueError(f"num_domains={num_domains}: routing statistics need at least one domain")
        names = tuple(domain_names) if domain_names is not None else tuple(f"domain{d}" for d in range(num_domains))
        if len(names) != num_domains:
            raise ValueError(f"{len(names)} domain names {list(names)} for num_domains={num_domains}; give one each")
        self.domain_names = names
        self.family_name = view.family.model_type
        self.moe_layers: tuple[int, ...] = tuple(view.moe_layers)
        self.num_layers, self.num_experts, self.top_k = view.num_layers, view.num_experts, view.top_k
        self._layer_index = {layer: i for i, layer in enumerate(self.moe_layers)}
        D, L, E = num_domains, len(self.moe_layers), self.num_experts
        zeros = dict(dtype=torch.float64)
        self.tokens_D = torch.zeros(D, **zeros)
        self.gate_sum_DLE = torch.zeros(D, L, E, **zeros)
        self.selected_DLE = torch.zeros(D, L, E, **zeros)
        self.weight_sum_DLE = torch.zeros(D, L, E, **zeros)
        self.top1_DLE = torch.zeros(D, L, E, **zeros)
        self.coactivation_LEE = torch.zeros(L, E, E, **zeros)
        self._domains_T: torch.Tensor | None = None

    @property
    def num_domains(self) -> int:
        return len(self.domain_names)

    def __repr__(self) -> str:
        return (
            f"RoutingStatistics({self.family_name}, domains={list(self.domain_names)}, moe_layers="
            f"{list(self.moe_layers)}, experts={self.num_experts}, top_k={self.top_k}, tokens={self.tokens_D.tolist()})"
        )

    # -- streaming -------------------------------------------------------------------------------------------------
    def attach(self, observer: RouterObserver) -> Subscription:
        """Subscribe :meth:`consume` to ``observer``; ``subscription.remove()`` stops the counting."""
        view = observer.view
        if tuple(view.moe_layers) != self.moe_layers or view.num_experts != self.num_experts:
            raise ValueError(
                f"the observer's model has MoE layers {view.moe_layers} with {view.num_experts} experts; these "
                f"statistics were made for MoE layers {list(self.moe_layers)} with {self.num_experts} experts"
            )
        return observer.subscribe(self.consume)

    def set_domains(self, domain_ids_T: torch.Tensor) -> None:
        """The domain of every token of the NEXT forward: int [T] (or [B, S], flattened row-major: the order the
        router sees tokens), values in 0..D-1, or -1 to leave a token out of every count. Used by that one
        forward: call it again before each forward."""
        integer = isinstance(domain_ids_T, torch.Tensor) and domain_ids_T.dtype in _INTEGER_DTYPES
        if not integer:
            raise TypeError(f"set_domains takes an integer tensor of domain ids, got {_describe(domain_ids_T)}")
        domains_T = domain_ids_T.detach().reshape(-1).to("cpu", torch.int64)
        bad = domains_T[(domains_T < -1) | (domains_T >= self.num_domains)]
        if bad.numel():
            raise ValueError(
                f"domain ids {sorted(set(bad.tolist()))[:8]} are out of range: there are {self.num_domains} domains "
                f"(0..{self.num_domains - 1}) and -1 marks a token to ignore"
            )
        self._domains_T = domains_T

    def consume(self, record: RoutingRecord) -> None:
        """Fold one MoE layer's routing of the current forward into the counts (the observer calls this)."""
        index = self._layer_index.get(record.layer)
        if index is None:
            raise ValueError(
                f"a routing record of layer {record.layer}, which is not one of the MoE layers "
                f"{list(self.moe_layers)} these statistics count"
            )
        domains_T = self._domains_T
        if domains_T is None:
            raise RuntimeError(
                f"layer {record.layer} routed tokens but no domains were set for this forward: call "
                "stats.set_domains(domain_ids.reshape(-1)) before each forward"
            )
        ids_TK = record.topk_ids_TK.detach().to("cpu", torch.int64)
        if ids_TK.shape[0] != domains_T.shape[0]:
            raise ValueError(
                f"layer {record.layer} routed {ids_TK.shape[0]} tokens but set_domains gave {domains_T.shape[0]} "
                "domain ids: pass one id per token of the next forward (domain_ids_BS.reshape(-1) for input_ids_BS)"
            )
        if index == len(self.moe_layers) - 1:
            self._domains_T = None  # used up: the next forward needs its own
        keep_T = domains_T >= 0
        domains_N = domains_T[keep_T]
        ids_NK = ids_TK[keep_T]
        weights_NK = record.topk_weights_TK.detach().to("cpu", torch.float64)[keep_T]
        probs_NE = router_scores(self.family_name, record.logits_TE[keep_T.to(record.logits_TE.device)])

        chosen_NE = torch.zeros(ids_NK.shape[0], self.num_experts, dtype=torch.float64).scatter_(1, ids_NK, 1.0)
        weights_NE = torch.zeros_like(chosen_NE).scatter_(1, ids_NK, weights_NK)
        top1_N = ids_NK.gather(1, weights_NK.argmax(dim=1, keepdim=True)).squeeze(1)
        top1_NE = torch.zeros_like(chosen_NE).scatter_(1, top1_N[:, None], 1.0)

        if index == 0:
            self.tokens_D += torch.bincount(domains_N, minlength=self.num_domains).to(torch.float64)
        self.gate_sum_DLE[:, index].index_add_(0, domains_N, probs_NE)
        self.selected_DLE[:, index].index_add_(0, domains_N, chosen_NE)
        self.weight_sum_DLE[:, index].index_add_(0, domains_N, weights_NE)
        self.top1_DLE[:, index].index_add_(0, domains_N, top1_NE)
        self.coactivation_LEE[index] += chosen_NE.T @ chosen_NE

    # -- combining -------------------------------------------------------------------------------------------------
    def counts(self) -> dict[str, torch.Tensor]:
        """The live count tensors by name (:data:`COUNTS`)."""
        return {name: getattr(self, name) for name in COUNTS}

    def merge_(self, other: RoutingStatistics) -> RoutingStatistics:
        """Add ``other``'s counts to these (same model and domains); returns self."""
        if not isinstance(other, RoutingStatistics):
            raise TypeError(f"merge_ takes RoutingStatistics, got {type(other).__name__}")
        self._check_same(other.moe_layers, other.num_experts, other.domain_names, "merge_")
        for name, tensor in self.counts().items():
            tensor += getattr(other, name)
        return self

    def all_reduce_(self, group=None) -> RoutingStatistics:
        """Sum every count over the ranks of ``group`` (default: the world), so that every rank holds the global
        counts; a no-op without an initialised process group. Returns self. A collective: every rank calls it.

        A plain sum is right in every layout, provided each rank streamed its own tokens: under data parallelism
        each replica routes its own rows; under expert parallelism (AutoEP) the router is replicated and every
        rank routes its own tokens before the all-to-all, so each rank's records cover exactly its own tokens.
        Ranks that streamed the same rows would count them once per rank."""
        sum_over_ranks_(list(self.counts().values()), group)
        return self

    # -- checkpointing ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Copies of the counts plus ``moe_layers_L`` (int64), all plain tensors."""
        state = {name: tensor.clone() for name, tensor in self.counts().items()}
        state["moe_layers_L"] = torch.tensor(self.moe_layers, dtype=torch.int64)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the counts with ``state`` (from :meth:`state_dict` of statistics of the same model/domains)."""
        missing = [name for name in (*COUNTS, "moe_layers_L") if name not in state]
        if missing:
            raise KeyError(f"routing statistics state is missing {missing}")
        moe_layers = tuple(int(i) for i in state["moe_layers_L"].tolist())
        if moe_layers != self.moe_layers:
            raise ValueError(f"state of MoE layers {list(moe_layers)}, these statistics count {list(self.moe_layers)}")
        for name, tensor in self.counts().items():
            if tuple(state[name].shape) != tuple(tensor.shape):
                raise ValueError(
                    f"state '{name}' has shape {tuple(state[name].shape)}, expected {tuple(tensor.shape)} "
                    f"({self.num_domains} domains, {len(self.moe_layers)} MoE layers, {self.num_experts} experts)"
                )
        for name, tensor in self.counts().items():
            tensor.copy_(state[name])

    def _check_same(self, moe_layers, num_experts, domain_names, what: str) -> None:
        mine = (self.moe_layers, self.num_experts, self.domain_names)
        theirs = (tuple(moe_layers), num_experts, tuple(domain_names))
        if mine != theirs:
            raise ValueError(
                f"{what}: statistics of (MoE layers, experts, domains) {theirs} do not add to statistics of {mine}"
            )


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__
