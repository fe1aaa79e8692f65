"""FlexOLMo-style opt-out: take experts out of a model at inference, with no retraining, two ways that agree.

* :class:`OptOut` is a router edit (forward hooks; the model is untouched, ``remove()`` or the end of a ``with``
  block takes it off): a listed expert can never be chosen and routing among the others is exactly that of a
  model built without it.
* :func:`remove_experts` builds that smaller model (same family, fewer experts per MoE layer, the listed experts'
  tensors, router rows and choice biases gone, the config's expert count updated); :func:`save_without_experts`
  writes it as a ``save_pretrained`` checkpoint that plain transformers loads::

    with OptOut(model, in_every_layer(3)):                 # expert 3 of every MoE layer opted out
        logits = model(input_ids).logits
    smaller = remove_experts(model, [(1, 3), (2, 3)])      # MoE layers 1, 2; the rest renumbered: old 4 is new 3
    save_without_experts("ckpt", in_every_layer(3), "ckpt-without-3")

**What "opted out" means.** Not a large negative bias: a finite bias can still be chosen (a token's other experts
can score lower; a sigmoid score never drops below 0 while DeepSeek-V3's choice bias can be negative). The hook
recomputes the router's logits for the kept experts only (``hidden @ weight[kept].T``, the very matmul the smaller
model's router runs: slicing the full [T, E] logits instead would differ by matmul rounding, ~1e-7), routes them
with the family's own rule (:class:`~connito.routing.edits.RoutingRule`; DeepSeek-V3's choice bias sliced to
match) and maps the chosen ids back to the model's numbering. The logits it returns carry -inf for opted-out
experts (softmax probability exactly 0), which is what a router observer records. So scoring, top-k,
renormalisation and scaling run on the tensors the smaller model computes, and the two agree **bit for bit**
(``torch.equal`` of the model's logits, asserted by the tests on the tiny models of every family; the expert
matmuls are per-expert slices of the same values, unchanged by renumbering). Gradients agree bit for bit too.
The kept logits are checked against the router's own (loosely): a router computing them otherwise (a logit edit
applied after the opt-out, whose hook runs first) is refused in the forward rather than silently overridden.

**Group-limited routing** (DeepSeek-V2 ``group_limited_greedy``, DeepSeek-V3): experts are split into ``n_group``
equal contiguous groups and only the ``topk_group`` best groups are choosable. A transformers config has one group
size, so a model built without some experts exists only when **every group of the layer loses the same number**;
then its groups are the old groups minus those experts and routing is exact as above. Anything else is refused
(opt-out and removal alike), as is a group left with fewer experts than its group score needs (2 for DeepSeek-V3's
top-2 sum) or fewer choosable experts than top-k.

Both refuse, with nothing hooked or built: ids that do not fit the model (dense layers, out of range), leaving a
layer fewer experts than top-k, expert-parallel AutoEP layers (opt out on the transformers model, ``ep_size=1``).
:func:`remove_experts` also needs every MoE layer to lose the same number of experts (one expert count per config).

Shape legend: T tokens of the forward, E routed experts per MoE layer (before opt-out), K experts per token, R the
experts a layer keeps.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from connito.experts import ExpertAddressError, ExpertId, ExpertMask, ExpertView
from connito.experts.blocks import HFMoEBlock, MoEBlock
from connito.experts.delta.staging import check_out_dir, copy_tokenizer_files, staged_dir
from connito.models.families import ModelError
from connito.models.loading import model_like, validate_checkpoint_dir
from connito.routing.edits import RouterEdit, routing_rule

log = logging.getLogger("connito.routing")

PROVENANCE_FILE = "connito_opt_out.json"


class OptOutError(ModelError):
    """Experts that cannot be opted out (or removed) exactly; the message says why and what to do instead."""


@dataclass(frozen=True)
class EveryMoELayer:
    """Expert indices meant in every MoE layer; resolved against a model when used (see :func:`in_every_layer`)."""

    experts: tuple[int, ...]

    def ids(self, view: ExpertView) -> list[ExpertId]:
        return [view.check_id((layer, expert)) for layer in view.moe_layers for expert in self.experts]


def in_every_layer(*experts: int) -> EveryMoELayer:
    """Expert indices ``experts`` of every MoE layer (dense layers have none), e.g. the experts a data owner
    contributed at the same index throughout the model."""
    return EveryMoELayer(tuple(int(e) for e in experts))


Experts = ExpertMask | EveryMoELayer | Iterable[Sequence[int]]
"""What to opt out: a mask, :func:`in_every_layer`, or global ``(layer, expert)`` ids."""


def as_mask(view: ExpertView, experts: Experts) -> ExpertMask:
    """``experts`` as a mask of ``view``'s model; :class:`ExpertAddressError` for ids that do not fit it."""
    if isinstance(experts, ExpertMask):
        if experts.shape != (view.num_layers, view.num_experts) or list(experts.moe_layers) != view.moe_layers:
            raise ExpertAddressError(
                f"the expert mask is [{experts.shape[0]} layers, {experts.shape[1]} experts] with MoE layers "
                f"{list(experts.moe_layers)}; the model has [{view.num_layers}, {view.num_experts}] with MoE layers "
                f"{view.moe_layers}"
            )
        return experts
    ids = experts.ids(view) if isinstance(experts, EveryMoELayer) else [view.check_id(e) for e in experts]
    return ExpertMask.from_ids(ids, view.num_layers, view.num_experts, view.moe_layers)


def kept_experts(view: ExpertView, mask: ExpertMask) -> dict[int, list[int]]:
    """For each MoE layer that loses experts, the experts it keeps (in order: their new ids are their positions).
    Refuses, naming why, what no model built without those experts could route exactly."""
    keep: dict[int, list[int]] = {}
    mask_LE = mask.mask_LE
    for layer, block in view.blocks():
        removed = mask_LE[layer].nonzero().flatten().tolist()
        if not removed:
            continue
        if not isinstance(block, HFMoEBlock):
            raise OptOutError(
                f"layer {layer} is an expert-parallel AutoEP layer: opt experts out of the transformers model "
                "(parallel.ep_size=1, or the exported checkpoint)"
            )
        kept = [e for e in range(block.num_experts) if e not in removed]
        if len(kept) < view.top_k:
            raise OptOutError(
                f"layer {layer} would keep {len(kept)} of {block.num_experts} experts, fewer than top-k "
                f"{view.top_k} (num_experts_per_tok): opt out at most {block.num_experts - view.top_k} experts per "
                "layer"
            )
        _check_groups(view, layer, block.num_experts, removed)
        keep[layer] = kept
    return keep


def _check_groups(view: ExpertView, layer: int, num_experts: int, removed: list[int]) -> None:
    rule = routing_rule(view, layer)
    if rule.groups is None:
        return
    num_groups, keep_groups = rule.groups
    size = num_experts // num_groups
    lost_G = [sum(1 for e in removed if e // size == g) for g in range(num_groups)]
    where = f"layer {layer} routes group-limited ({num_groups} groups of {size} experts, best {keep_groups} choosable)"
    if len(set(lost_G)) > 1:
        raise OptOutError(
            f"{where}; opting out {removed} takes {lost_G} experts from the groups. A model without them exists only "
            "if every group loses the same number (its config has one group size): opt out as many experts from "
            "each group"
        )
    left = size - lost_G[0]
    needed = 2 if rule.group_score == "top2_sum" else 1
    if left < needed:
        raise OptOutError(f"{where}; each group would keep {left} experts, its group score needs {needed}")
    if keep_groups * left < view.top_k:
        raise OptOutError(
            f"{where}; the {keep_groups} choosable groups would hold {keep_groups * left} experts, fewer than top-k "
            f"{view.top_k}"
        )


class OptOut(RouterEdit):
    """Opt ``experts`` out of ``model``'s routing at inference: never chosen, the rest routed exactly as by the
    model :func:`remove_experts` builds (see the module docstring). Opting nothing out hooks nothing."""

    def __init__(self, model: nn.Module, experts: Experts, view: ExpertView | None = None):
        view = view or ExpertView(model)
        self.opted_out = as_mask(view, experts)
        self.kept = kept_experts(view, self.opted_out)
        super().__init__(model, {expert_id: 1.0 for expert_id in self.opted_out.ids()}, view=view)

    def _check(self, values_GME: torch.Tensor) -> None:
        if not ((values_GME == 0) | (values_GME == 1)).all():  # only this class builds them: a guard
            raise ValueError("OptOut values are 0 (kept) or 1 (opted out)")

    def _hook(self, layer: int, block: MoEBlock, values_GE: torch.Tensor) -> list:
        if layer not in self.kept:
            return []
        opted_out_E = values_GE[0] != 0
        kept_R = torch.tensor(self.kept[layer])

        def hf_hook(module, args, kwargs, output):
            logits_TE, weights_TK, ids_TK = output
            hidden = args[0] if args else kwargs["hidden_states"]
            kept = kept_R.to(logits_TE.device)
            logits_TR = kept_logits(hidden, block.router_weight(), kept, logits_TE)
            rule = routing_rule(self.view, layer)
            if rule.choice_bias_E is not None:
                rule = replace(rule, choice_bias_E=rule.choice_bias_E[kept])
            new_weights_TK, kept_ids_TK = rule.route(logits_TR)
            return (
                logits_TE.masked_fill(opted_out_E.to(logits_TE.device), float("-inf")),
                new_weights_TK.to(weights_TK.dtype),
                kept[kept_ids_TK].to(ids_TK.dtype),
            )

        return [block.router_module.register_forward_hook(hf_hook, prepend=True, with_kwargs=True)]


def kept_logits(
    hidden: torch.Tensor, weight_EH: torch.Tensor, kept_R: torch.Tensor, logits_TE: torch.Tensor
) -> torch.Tensor:
    """The logits [T, R] a router holding only rows ``kept_R`` computes: ``hidden @ weight[kept].T`` in the
    logits' dtype, as every built-in family computes them. Recomputed rather than sliced from ``logits_TE`` because
    a matmul over R rows may round differently than over E (by ~1e-7, enough to change the logits downstream by
    ~1e-6); checked against ``logits_TE`` so that a router computing its logits some other way is refused."""
    dtype = logits_TE.dtype
    hidden_TH = hidden.reshape(-1, weight_EH.shape[1]).to(dtype)
    logits_TR = nn.functional.linear(hidden_TH, weight_EH.index_select(0, kept_R).to(dtype))
    expected_TR = logits_TE.index_select(1, kept_R)
    scale = expected_TR.abs().max().clamp_min(1.0)
    tolerance = (3e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-4) * scale
    if logits_TR.shape != expected_TR.shape or (logits_TR - expected_TR).abs().max() > tolerance:
        raise OptOutError(
            "OptOut recomputes the kept experts' router logits as hidden @ weight.T, and this router computes its "
            "logits otherwise (a bias or a scale?): build the model without the experts with remove_experts instead"
        )
    return logits_TR


# -- the smaller model -------------------------------------------------------------------------------------------


def _per_expert_names(model: nn.Module, block: HFMoEBlock) -> list[str]:
    """State-dict names of ``block``'s tensors with one row per routed expert: router weight, stacked experts,
    choice bias."""
    tensors = [block.router_weight(), *block.stacked_params().values()]
    if block.choice_bias() is not None:
        tensors.append(block.choice_bias())
    names: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        names.setdefault(id(tensor), []).append(name)
    return [name for tensor in tensors for name in names[id(tensor)]]


def remove_experts(model: PreTrainedModel, experts: Experts) -> PreTrainedModel:
    """A new model of ``model``'s class without ``experts``: every MoE layer must lose the same number of them;
    the others are renumbered in order. ``model`` is not changed (the new one has its own tensors)."""
    view = ExpertView(model)
    mask = as_mask(view, experts)
    kept = kept_experts(view, mask)
    lost = {layer: view.num_experts - len(kept.get(layer, range(view.num_experts))) for layer in view.moe_layers}
    if len(set(lost.values())) > 1:
        raise OptOutError(
            f"MoE layers would lose different numbers of experts ({lost}); a transformers config has one expert "
            "count for every layer. Remove as many experts from each MoE layer (in_every_layer(...) does), or opt "
            "them out at inference with OptOut, which has no such limit"
        )
    config = copy.deepcopy(model.config)
    setattr(config, view.layout.num_experts_key, view.num_experts - lost[view.moe_layers[0]])
    state = {name: tensor.detach() for name, tensor in model.state_dict().items()}
    for layer, block in view.blocks():
        if layer in kept:
            rows = torch.tensor(kept[layer], device=block.router_weight().device)
            for name in _per_expert_names(model, block):
                state[name] = state[name].index_select(0, rows)
    return model_like(model, config, state)


def save_without_experts(
    checkpoint_dir: str | Path, experts: Experts, out_dir: str | Path, *, overwrite: bool = False
) -> Path:
    """Write the checkpoint at ``checkpoint_dir`` without ``experts`` to ``out_dir`` (``save_pretrained``,
    safetensors, in the checkpoint's dtype, its tokenizer files copied, ``connito_opt_out.json`` saying which old
    expert each new one is). Every refusal comes before anything is written; the directory appears complete or
    not at all."""
    source = Path(checkpoint_dir).expanduser().resolve()
    out = check_out_dir(out_dir, overwrite, {"the checkpoint": source})
    validate_checkpoint_dir(source)
    model = AutoModelForCausalLM.from_pretrained(source, local_files_only=True, dtype="auto").eval()
    view = ExpertView(model)
    mask = as_mask(view, experts)
    smaller = remove_experts(model, mask)
    kept = kept_experts(view, mask)
    with staged_dir(out) as stage:
        smaller.save_pretrained(stage, safe_serialization=True)
        copy_tokenizer_files(source, stage)
        provenance = {
            "source": str(source),
            "removed": mask.to_dict(),
            "kept": {str(layer): kept.get(layer, list(range(view.num_experts))) for layer in view.moe_layers},
        }
        (stage / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    log.info("%s without %d experts written to %s", source, len(mask), out)
    return out
