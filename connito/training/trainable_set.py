"""What trains, resolved against a live model: a :class:`TrainableSet` (routed experts by global ``(layer, expert)``,
plus shared experts, routers or router rows, and modules by name glob when asked) becomes one row mask per parameter
(:class:`ParamMask`, ``keep_R``: a bool per index of dimension 0), for plain transformers and AutoEP-sharded models
alike. :mod:`connito.training.grad_masks` makes those masks exact in training (frozen flags, masked gradients and
updates); see its docstring for the mechanisms and what is supported.

Shape legend: L decoder layers, E routed experts per MoE layer, R rows of a parameter (its dimension 0), G lean slots.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from connito.experts import ExpertAddressError, ExpertMask, ExpertView
from connito.experts.autoep_mapping import AUTOEP_EXPERT_NAME, hf_expert_param, hf_name
from connito.experts.blocks import AutoEPMoEBlock, MoEBlock
from connito.experts.lean import LeanSlots
from connito.experts.lean.install import lean_layers
from connito.training.zero_partitions import Ranges, rows_to_ranges


class GradientMaskError(ValueError):
    """A trainable set or engine the gradient mask cannot honour exactly; the message names the fix."""


@dataclass(frozen=True)
class TrainableSet:
    """What trains. Default: the routed experts in ``experts`` alone.

    ``shared_experts``: every MoE layer's shared experts (and their gate); ``routers``: every MoE layer's whole
    router; ``router_rows``: only the router rows (dimension 0 of the router weight [E, H], and of a router bias [E]
    where the family has one) of each layer's trainable routed experts, every other row bit-identical (FlexOLMo:
    a data owner trains its own expert and router row, the public ones stay frozen); ``routers`` and
    ``router_rows`` exclude each other. ``modules``: ``fnmatch`` globs over parameter names in the transformers
    naming (``model.layers.*.self_attn.*``, ``lm_head.weight``), matched on AutoEP-swapped models through the same
    names (tied names count)."""

    experts: ExpertMask
    shared_experts: bool = False
    routers: bool = False
    modules: tuple[str, ...] = field(default=())
    router_rows: bool = False

    def __post_init__(self):
        if self.routers and self.router_rows:
            raise GradientMaskError(
                "routers=true trains every router whole and router_rows=true only the rows of the trainable "
                "experts: choose one (router_rows=true for FlexOLMo-style training of an owner's router row)"
            )

    def to_dict(self) -> dict:
        return {
            "experts": self.experts.to_dict(),
            "shared_experts": self.shared_experts,
            "routers": self.routers,
            "router_rows": self.router_rows,
            "modules": list(self.modules),
        }

    @classmethod
    def from_dict(cls, data: dict) -> TrainableSet:
        return cls(
            ExpertMask.from_dict(data["experts"]),
            bool(data.get("shared_experts", False)),
            bool(data.get("routers", False)),
            tuple(data.get("modules", ())),
            bool(data.get("router_rows", False)),
        )


@dataclass
class ParamMask:
    """One parameter's trainable rows (dimension 0): ``keep_R`` [R] bool, on the CPU."""

    name: str
    param: nn.Parameter
    keep_R: torch.Tensor

    @property
    def rows(self) -> int:
        return self.keep_R.numel()

    @property
    def any(self) -> bool:
        return bool(self.keep_R.any())

    @property
    def all(self) -> bool:
        return bool(self.keep_R.all())

    def ranges(self) -> Ranges:
        """Trainable elements of the flattened parameter."""
        return rows_to_ranges(self.keep_R, self.param.numel() // self.rows)

    def trainable_numel(self) -> int:
        return int(self.keep_R.sum()) * (self.param.numel() // self.rows)


def param_rows(param: nn.Parameter) -> int:
    """Rows of ``param`` as masks count them: its dimension 0 (1 for a scalar)."""
    return param.shape[0] if param.dim() > 0 else 1


def transformers_names(model: nn.Module, view: ExpertView) -> dict[int, list[str]]:
    """``id(param) -> its names`` in the transformers naming (every name of a tied parameter; AutoEP's swapped
    blocks mapped back through :mod:`connito.experts.autoep_mapping`), plus the live names."""
    autoep = {block.prefix: block for _, block in view.blocks() if isinstance(block, AutoEPMoEBlock)}
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        out = names.setdefault(id(param), [])
        out.append(name)
        for prefix, block in autoep.items():
            if not name.startswith(prefix + "."):
                continue
            relative = name[len(prefix) + 1 :]
            expert = AUTOEP_EXPERT_NAME.fullmatch(name)
            if expert is not None:
                out.append(f"{prefix}.{block.layout.experts_attr}.{hf_expert_param(expert.group(2))}")
            elif (mapped := hf_name(relative, block.layout)) is not None:
                out.append(f"{prefix}.{mapped}")
    return names


def check_expert_mask(model: nn.Module, trainable: TrainableSet) -> ExpertView:
    """The model's expert view; :class:`GradientMaskError` naming the fix when ``trainable``'s mask does not fit it."""
    view = ExpertView(model)
    experts = trainable.experts
    if experts.shape != (view.num_layers, view.num_experts) or list(experts.moe_layers) != view.moe_layers:
        raise GradientMaskError(
            f"the expert mask has shape {experts.shape} over MoE layers {list(experts.moe_layers)}; the model has "
            f"{view.num_layers} layers x {view.num_experts} experts, MoE layers {view.moe_layers}. Build the mask "
            "for this model (ExpertView(model).empty_mask())"
        )
    return view


def resolve_masks(model: nn.Module, trainable: TrainableSet) -> list[ParamMask]:
    """Every parameter of ``model`` (each once) with its trainable rows under ``trainable``.

    Raises :class:`GradientMaskError` when the expert mask does not fit the model or a module glob matches no
    parameter (a typo would otherwise train nothing silently)."""
    view = check_expert_mask(model, trainable)
    experts = trainable.experts
    mask_LE = experts.mask_LE
    keep: dict[int, torch.Tensor] = {}
    params: dict[int, tuple[str, nn.Parameter]] = {}
    for name, param in model.named_parameters():
        params[id(param)] = (name, param)
        keep[id(param)] = torch.zeros(param_rows(param), dtype=torch.bool)

    def train_whole(module: nn.Module | None) -> None:
        for param in [] if module is None else module.parameters():
            keep[id(param)][:] = True

    lean = lean_layers(model)
    for piece in view.expert_param_slices():
        if piece.layer in lean:  # frozen storage: this layer's trainable experts train through its slots
            continue
        if piece.expert_dim != 0:
            raise GradientMaskError(f"{piece.name}: experts along dimension {piece.expert_dim}; masks cut dimension 0")
        rows = mask_LE[piece.layer, piece.experts.start : piece.experts.stop]
        if rows.numel() != len(piece.experts):
            raise GradientMaskError(
                f"{piece.name} holds experts {piece.experts.start}..{piece.experts.stop - 1} of layer {piece.layer}, "
                f"beyond the mask's {experts.shape[1]} experts"
            )
        keep[id(piece.param)] |= rows
    for layer, slots in lean.items():
        _check_covered(slots, mask_LE[layer])
        rows_G = torch.tensor([e >= 0 and bool(mask_LE[layer, e]) for e in slots.global_ids], dtype=torch.bool)
        for param in slots.parameters():
            keep[id(param)] |= rows_G
    for layer, block in view.blocks():
        if trainable.routers:
            train_whole(block.router_module)
        elif trainable.router_rows:
            for param, rows_E in _router_row_masks(layer, block, mask_LE[layer]):
                keep[id(param)] |= rows_E
        if trainable.shared_experts:
            train_whole(block.shared_experts())
            train_whole(block.shared_expert_gate())
    if trainable.modules:
        names = transformers_names(model, view)
        for pattern in trainable.modules:
            hits = [pid for pid, aliases in names.items() if any(fnmatch.fnmatchcase(n, pattern) for n in aliases)]
            if not hits:
                raise GradientMaskError(
                    f"modules: '{pattern}' matches no parameter of {type(model).__name__}. Globs match transformers "
                    f"parameter names, e.g. '{next(iter(params.values()))[0]}'"
                )
            for pid in hits:
                keep[pid][:] = True
    return [ParamMask(name, param, keep[pid]) for pid, (name, param) in params.items()]


def _check_covered(slots: LeanSlots, row_E: torch.Tensor) -> None:
    """In a layer with lean slots only the slots' experts can train (the fused tensors are frozen storage); the
    experts other expert-parallel ranks hold are theirs to check."""
    wanted = [e for e in slots.held if row_E[e]]
    outside = sorted(set(wanted) - set(slots.global_ids))
    if outside:
        raise GradientMaskError(
            f"experts {[[slots.layer, e] for e in outside]} cannot become trainable: layer {slots.layer}'s lean slots "
            f"hold experts {[e for e in slots.global_ids if e >= 0]} (the set trainable when the engine was built). "
            "Freeze with the widest set the run will use (the union of its phases), then narrow it with "
            "set_trainable"
        )


def _router_row_masks(layer: int, block: MoEBlock, rows_E: torch.Tensor) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """``router_rows``: each parameter of ``block``'s router with its trainable rows (``rows_E``, the layer's
    trainable experts in the global numbering). Every router parameter must have one row per global expert (the
    weight [E, H], a bias [E]); anything else cannot be cut by expert and is refused."""
    weight = block.router_weight()
    num_experts = block.num_experts
    if weight.dim() != 2 or weight.shape[0] != num_experts:
        raise GradientMaskError(
            f"router_rows: the router weight of layer {layer} ({block.prefix}) has shape {list(weight.shape)}, not "
            f"[E, H] with E = {num_experts} global experts, so its rows cannot be cut by expert. Train it whole "
            "(routers=true) or train on the transformers model (parallel.ep_size=1)"
        )
    out = []
    for name, param in block.router_module.named_parameters():
        if param.dim() == 0 or param.shape[0] != num_experts:
            raise GradientMaskError(
                f"router_rows: the router of layer {layer} ({block.prefix}) holds '{name}' of shape "
                f"{list(param.shape)}, which has no row per expert. Train the routers whole (routers=true) instead"
            )
        out.append((param, rows_E.clone()))
    if not any(param is weight for param, _ in out):
        raise GradientMaskError(
            f"router_rows: layer {layer}'s router weight is not a parameter of its router module {block.prefix}; "
            "train the routers whole (routers=true) instead"
        )
    return out


def expert_mask_from_ids(view: ExpertView, ids: Iterable[Sequence[int]]) -> ExpertMask:
    """An :class:`ExpertMask` of ``view``'s model holding ``ids`` (``[[layer, expert], ...]``)."""
    try:
        return ExpertMask.from_ids(ids, view.num_layers, view.num_experts, view.moe_layers)
    except ExpertAddressError as err:
        raise GradientMaskError(f"experts: {err}") from None
