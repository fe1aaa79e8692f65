"""The one view of a live model's experts, in any layout.

``ExpertView(model)`` works on a plain transformers model and on one whose MoE blocks DeepSpeed AutoEP swapped for
expert-parallel layers (``parallel.ep_size > 1``: each rank holds E/N experts of every MoE layer). Experts are
addressed by their global ``(layer, expert)`` id whatever the layout (see :mod:`connito.experts.addressing`)::

    view = ExpertView(engine.module)
    view.moe_layers                     # [1, 2, 3]: decoder layers with an MoE block (dense layers left out)
    view.owner((2, 5))                  # the expert-parallel rank holding expert 5 of layer 2 (0 when unsharded)
    view.read_expert((2, 5))            # {"gate_up_proj": [2I, H], "down_proj": [H, I]}, copies
    view.write_expert((2, 5), tensors)  # in place, on the rank that holds it
    view.router_weight(2)               # the live [E, H] router weight (every rank holds all of it)

Under expert parallelism :meth:`ExpertView.read_expert` is a collective over the expert-parallel group (the owner
broadcasts); :meth:`ExpertView.write_expert` is not (every rank checks the tensors, the owner writes). Under ZeRO-3
reading or writing a partitioned parameter is refused with the fix (gather the parameters first).

Shape legend: L decoder layers, E routed experts per MoE layer, H hidden size, I expert FFN width.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from connito.experts.addressing import ExpertAddressError, ExpertId, ExpertMask, check_expert_id
from connito.experts.blocks import (
    AutoEPMoEBlock,
    ExpertParamSlice,
    HFMoEBlock,
    MoEBlock,
    autoep_layer_class,
    check_materialized,
)
from connito.experts.lean.slots import sync as lean_sync
from connito.models.families import Family, ModelError, get_family


class ParameterCount(NamedTuple):
    non_expert: int
    """Everything that is not a routed expert: embeddings, attention, norms, routers, shared experts, dense MLPs."""
    per_expert: int
    """Parameters of one routed expert (all its slices)."""
    num_routed_experts: int
    """Routed experts in the whole model: MoE layers x experts per layer."""


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    base = getattr(model, "base_model", model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ExpertAddressError(
            f"{type(model).__name__} has no decoder layers at base_model.layers; the expert view expects a "
            "transformers model (ForCausalLM or its base model)"
        )
    return layers


def family_of(model: nn.Module) -> Family:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None:
        raise ModelError(f"{type(model).__name__} has no config.model_type; the expert view needs a transformers model")
    return get_family(model_type)


class ExpertView:
    """Global (layer, expert) addressing over ``model``'s MoE layers in whatever layout holds them."""

    def __init__(self, model: nn.Module):
        self.model = model
        lean_sync(model)  # trained lean slots into their fused rows: reads see the current experts
        self.family = family_of(model)
        if not self.family.is_moe:
            raise ExpertAddressError(
                f"{type(model).__name__} ({self.family.model_type}) is a dense model: it has no experts to address"
            )
        self.layout = self.family.layout
        config = model.config
        self.num_experts = int(getattr(config, self.layout.num_experts_key))
        self.top_k = int(getattr(config, self.layout.top_k_key))
        layers = decoder_layers(model)
        self.num_layers = len(layers)
        prefixes = {id(m): name for name, m in model.named_modules()}
        autoep = autoep_layer_class()
        self._blocks: dict[int, MoEBlock] = {}
        for index, layer in enumerate(layers):
            module = getattr(layer, self.layout.block_attr, None)
            if module is None:
                continue
            if autoep is not None and isinstance(module, autoep):
                self._blocks[index] = AutoEPMoEBlock(module, prefixes[id(module)], self.layout)
            elif HFMoEBlock.matches(module, self.layout):
                self._blocks[index] = HFMoEBlock(module, prefixes[id(module)], self.layout, self.num_experts)
        if not self._blocks:
            raise ExpertAddressError(
                f"found no MoE block in {type(model).__name__} ({self.family.model_type}): no decoder layer's "
                f"'{self.layout.block_attr}' holds a router and experts"
            )

    def __repr__(self) -> str:
        return (
            f"ExpertView({self.family.model_type}, layers={self.num_layers}, moe_layers={self.moe_layers}, "
            f"experts={self.num_experts}, ep_size={self.ep_size})"
        )

    # -- layout ----------------------------------------------------------------------------------------------------
    @property
    def moe_layers(self) -> list[int]:
        return sorted(self._blocks)

    @property
    def dense_layers(self) -> list[int]:
        return [i for i in range(self.num_layers) if i not in self._blocks]

    @property
    def ep_size(self) -> int:
        return next(iter(self._blocks.values())).ep_size

    @property
    def ep_rank(self) -> int:
        return next(iter(self._blocks.values())).ep_rank

    @property
    def is_sharded(self) -> bool:
        return self.ep_size > 1

    def blocks(self) -> Iterator[tuple[int, MoEBlock]]:
        return iter(sorted(self._blocks.items()))

    def block(self, layer: int) -> MoEBlock:
        if layer not in self._blocks:
            check_expert_id((layer, 0), self.num_layers, self.num_experts, self.moe_layers)
        return self._blocks[layer]

    def check_id(self, expert_id: Sequence[int]) -> ExpertId:
        """``expert_id`` as an :class:`ExpertId`, or :class:`ExpertAddressError` saying what does not fit (a layer's
        own expert count counts: router rows may have been added or removed)."""
        block = self._blocks.get(int(expert_id[0])) if len(expert_id) == 2 else None
        num_experts = block.num_experts if block is not None else self.num_experts
        return check_expert_id(expert_id, self.num_layers, num_experts, self.moe_layers)

    def empty_mask(self) -> ExpertMask:
        return ExpertMask.empty(self.num_layers, self.num_experts, self.moe_layers)

    def owner(self, expert_id: Sequence[int]) -> int:
        """The expert-parallel rank (within its group) that holds the expert; 0 when unsharded."""
        layer, expert = self.check_id(expert_id)
        return self._blocks[layer].owner(expert)

    def holds(self, expert_id: Sequence[int]) -> bool:
        layer, expert = self.check_id(expert_id)
        return expert in self._blocks[layer].local_experts

    def local_experts(self, layer: int) -> list[int]:
        return list(self.block(layer).local_experts)

    # -- one expert ------------------------------------------------------------------------------------------------
    def read_expert(self, expert_id: Sequence[int]) -> dict[str, torch.Tensor]:
        """Copies of one expert in transformers form: ``gate_up_proj`` [2I, H] (gate rows first), ``down_proj``
        [H, I]. Sharded: a collective over the expert-parallel group; every rank of it gets the tensors."""
        layer, expert = self.check_id(expert_id)
        block = self._blocks[layer]
        if block.ep_size == 1:
            return block.read_local(expert)
        if block.ep_group is None:
            raise ExpertAddressError(
                f"{block.prefix} has no expert-parallel group yet: read experts after deepspeed.initialize"
            )
        shapes, dtype = block.expert_shapes()
        owner = dist.get_global_rank(block.ep_group, block.owner(expert))
        if expert in block.local_experts:
            tensors = block.read_local(expert)
        else:
            device = next(iter(block.stacked_params().values())).device
            tensors = {name: torch.empty(shape, dtype=dtype, device=device) for name, shape in shapes.items()}
        for name in sorted(tensors):
            dist.broadcast(tensors[name], src=owner, group=block.ep_group)
        return tensors

    def write_expert(self, expert_id: Sequence[int], tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy ``tensors`` (transformers form, exact names, shapes and dtype) into one expert in place. Every rank
        may call it; the rank holding the expert writes, the others only check the tensors."""
        layer, expert = self.check_id(expert_id)
        block = self._blocks[layer]
        shapes, dtype = block.expert_shapes()
        where = f"write_expert{(layer, expert)}"
        missing, extra = sorted(set(shapes) - set(tensors)), sorted(set(tensors) - set(shapes))
        if missing or extra:
            raise ExpertAddressError(
                f"{where}: missing tensors {missing}, unexpected tensors {extra}; expected exactly {sorted(shapes)}"
            )
        for name, shape in shapes.items():
            source = tensors[name]
            if tuple(source.shape) != shape:
                raise ExpertAddressError(f"{where}: '{name}' has shape {tuple(source.shape)}, expected {shape}")
            if source.dtype != dtype:
                raise ExpertAddressError(
                    f"{where}: '{name}' has dtype {source.dtype}, expected {dtype} (cast it first; "
                    "write_expert never changes precision silently)"
                )
        if expert in block.local_experts:
            block.write_local(expert, tensors)

    # -- routers ---------------------------------------------------------------------------------------------------
    def router_weight(self, layer: int) -> nn.Parameter:
        """The live [E, H] router weight of an MoE layer (every rank holds all of it)."""
        weight = self.block(layer).router_weight()
        check_materialized(weight, f"layer {layer} router weight")
        return weight

    def read_router(self, layer: int) -> torch.Tensor:
        return self.router_weight(layer).detach().clone()

    def write_router_rows(self, layer: int, experts: Sequence[int], rows_NH: torch.Tensor) -> None:
        """Overwrite the router rows of ``experts`` (global ids of ``layer``) with ``rows_NH`` [len(experts), H]."""
        weight = self.router_weight(layer)
        for expert in experts:
            self.check_id((layer, expert))
        expected = (len(experts), weight.shape[1])
        if tuple(rows_NH.shape) != expected or rows_NH.dtype != weight.dtype:
            raise ExpertAddressError(
                f"write_router_rows(layer {layer}): rows are {rows_NH.dtype} {tuple(rows_NH.shape)}, expected "
                f"{weight.dtype} {expected}"
            )
        with torch.no_grad():
            weight[list(experts)] = rows_NH

    def add_router_rows(self, layer: int, rows_NH: torch.Tensor) -> list[int]:
        """Append router rows (new experts get the next global ids, returned); the model's other parts are left to
        the caller. Only on an unsharded transformers model: AutoEP's layers have a fixed expert count."""
        block = self._unsharded(layer, "add_router_rows")
        weight = block.router_weight()
        if rows_NH.dim() != 2 or rows_NH.shape[1] != weight.shape[1] or rows_NH.dtype != weight.dtype:
            raise ExpertAddressError(
                f"add_router_rows(layer {layer}): rows are {rows_NH.dtype} {tuple(rows_NH.shape)}, expected "
                f"{weight.dtype} [N, {weight.shape[1]}]"
            )
        first = weight.shape[0]
        self._replace_router(block, torch.cat([weight.detach(), rows_NH.to(weight.device)]))
        return list(range(first, first + rows_NH.shape[0]))

    def remove_router_rows(self, layer: int, experts: Sequence[int]) -> None:
        """Drop the router rows of ``experts``; the remaining experts are renumbered in order. Only on an unsharded
        transformers model."""
        block = self._unsharded(layer, "remove_router_rows")
        for expert in experts:
            self.check_id((layer, expert))
        keep = [e for e in range(block.num_experts) if e not in set(experts)]
        if len(keep) < self.top_k:
            raise ExpertAddressError(
                f"remove_router_rows(layer {layer}): {len(keep)} experts would remain, fewer than top-k {self.top_k}"
            )
        self._replace_router(block, block.router_weight().detach()[keep])

    def _unsharded(self, layer: int, what: str) -> HFMoEBlock:
        block = self.block(layer)
        if not isinstance(block, HFMoEBlock):
            raise ExpertAddressError(
                f"{what}: layer {layer} is an expert-parallel AutoEP layer with a fixed number of experts; change the "
                "router on the exported transformers model (parallel.ep_size=1)"
            )
        return block

    def _replace_router(self, block: HFMoEBlock, weight_EH: torch.Tensor) -> None:
        old = block.router_weight()
        block.router_module.weight = nn.Parameter(weight_EH.contiguous(), requires_grad=old.requires_grad)
        bias = block.choice_bias()
        if bias is not None and bias.shape[0] != weight_EH.shape[0]:
            raise ExpertAddressError(
                f"{block.prefix}: the choice bias has {bias.shape[0]} entries, the router now {weight_EH.shape[0]} "
                "rows; resize it with write_choice_bias"
            )
        block.set_num_experts(weight_EH.shape[0])

    def choice_bias(self, layer: int) -> torch.Tensor | None:
        """The live [E] bias added to the scores for choosing experts, not for weighting them (DeepSeek-V3's
        ``e_score_correction_bias``); None for families without one."""
        return self.block(layer).choice_bias()

    def write_choice_bias(self, layer: int, bias_E: torch.Tensor) -> None:
        block = self.block(layer)
        current = block.choice_bias()
        if current is None:
            raise ExpertAddressError(f"{self.family.model_type} routers have no choice bias (layer {layer})")
        if tuple(bias_E.shape) != tuple(current.shape) or bias_E.dtype != current.dtype:
            raise ExpertAddressError(
                f"write_choice_bias(layer {layer}): got {bias_E.dtype} {tuple(bias_E.shape)}, expected "
                f"{current.dtype} {tuple(current.shape)}"
            )
        with torch.no_grad():
            current.copy_(bias_E)

    # -- shared experts and parameters -----------------------------------------------------------------------------
    def shared_experts(self, layer: int) -> nn.Module | None:
        """The always-on dense path beside the routed experts, or None."""
        return self.block(layer).shared_experts()

    def shared_expert_gate(self, layer: int) -> nn.Module | None:
        """The module scaling the shared expert's output per token (Qwen2-MoE: sigmoid of a [1, H] Linear)."""
        return self.block(layer).shared_expert_gate()

    def expert_param_slices(self) -> list[ExpertParamSlice]:
        """Every stacked expert parameter this process holds, with its name, layer and global expert range."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        return [s for layer, block in self.blocks() for s in block.param_slices(layer, names)]

    def count_parameters(self) -> ParameterCount:
        """Counts of the whole (unsharded) model: ``non_expert + num_routed_experts * per_expert``."""
        local_expert_numel, per_layer = 0, set()
        for _, block in self.blocks():
            params = block.stacked_params()
            local_expert_numel += sum(p.numel() for p in params.values())
            per_layer.add(sum(p[0].numel() for p in params.values()))
        if len(per_layer) > 1:
            raise ExpertAddressError(f"routed experts differ in size across layers: {sorted(per_layer)}")
        total = sum(p.numel() for p in self.model.parameters())
        return ParameterCount(total - local_expert_numel, per_layer.pop(), len(self._blocks) * self.num_experts)
