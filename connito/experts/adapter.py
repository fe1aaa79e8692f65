"""Where a transformers MoE family keeps its experts, and how to read and write one of them.

Every layer above (routing, analysis, masks, merges, pruning, expert parallelism) reaches experts only through a
:class:`MoEAdapter`. transformers 5.x lays every supported family out the same way, so one implementation serves
them all, parameterised by a small :class:`MoELayout` of attribute names (see ``families.py``)::

    model.base_model.layers[l].mlp            MoE block (or a dense MLP: no ``experts``/``gate``)
        .gate                                 router; ``.weight`` [E, H] is a bare Parameter, not an nn.Linear
        .experts.gate_up_proj                 [E, 2I, H] fused gate and up projections of all routed experts
        .experts.down_proj                    [E, H, I]
        .shared_expert(s) / .shared_expert_gate   family specific, optional

Shape legend: L decoder layers, E routed experts per MoE layer, H hidden size, I routed expert FFN width.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from connito.experts.addressing import ExpertAddressError, ExpertId, ExpertMask, check_expert_id


@dataclass(frozen=True)
class MoELayout:
    """The attribute names one family uses; every field has the value most families use."""

    num_experts_key: str = "num_experts"
    """Config attribute holding the global number of routed experts per MoE layer."""
    top_k_key: str = "num_experts_per_tok"
    block_attr: str = "mlp"
    """Attribute of a decoder layer holding its MoE block (or its dense MLP)."""
    router_attr: str = "gate"
    experts_attr: str = "experts"
    expert_param_names: tuple[str, ...] = ("gate_up_proj", "down_proj")
    """Fused parameters of the experts module, expert dimension first."""
    shared_experts_attr: str | None = None
    shared_expert_gate_attr: str | None = None
    router_bias_attr: str | None = None
    """A per-expert bias added to the scores for choosing (not weighting) experts, e.g. DeepSeek-V3's
    ``e_score_correction_bias`` buffer."""


class ExpertParamSlice(NamedTuple):
    """A fused expert parameter and which decoder layer it belongs to; slice ``expert_dim`` to reach one expert."""

    name: str
    param: nn.Parameter
    layer: int
    expert_dim: int


class ParameterCount(NamedTuple):
    non_expert: int
    """Everything that is not a routed expert: embeddings, attention, norms, routers, shared experts, dense MLPs."""
    per_expert: int
    """Parameters of one routed expert (all its fused slices)."""
    num_routed_experts: int
    """Routed experts in the whole model: MoE layers x experts per layer."""


class MoEAdapter:
    """Addressing of one family's experts. Stateless: one instance serves every model of the family."""

    def __init__(self, model_type: str, layout: MoELayout):
        self.model_type = model_type
        self.layout = layout

    def __repr__(self) -> str:
        return f"MoEAdapter({self.model_type!r}, {self.layout})"

    # -- where things are --------------------------------------------------------------------------------------
    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        base = getattr(model, "base_model", model)
        layers = getattr(base, "layers", None)
        if not isinstance(layers, nn.ModuleList):
            raise ExpertAddressError(
                f"{type(model).__name__} has no decoder layers at base_model.layers; the {self.model_type} adapter "
                "expects a transformers model (ForCausalLM or its base model)"
            )
        return layers

    def is_moe_block(self, module: nn.Module) -> bool:
        experts = getattr(module, self.layout.experts_attr, None)
        return (
            isinstance(experts, nn.Module)
            and isinstance(getattr(module, self.layout.router_attr, None), nn.Module)
            and all(isinstance(getattr(experts, n, None), nn.Parameter) for n in self.layout.expert_param_names)
        )

    def moe_layers(self, model: nn.Module) -> dict[int, nn.Module]:
        """Decoder layer index -> MoE block, dense layers left out."""
        blocks = {}
        for index, layer in enumerate(self.decoder_layers(model)):
            block = getattr(layer, self.layout.block_attr, None)
            if block is not None and self.is_moe_block(block):
                blocks[index] = block
        return blocks

    def num_layers(self, model: nn.Module) -> int:
        return len(self.decoder_layers(model))

    def num_experts(self, model: nn.Module) -> int:
        """Routed experts per MoE layer in the checkpoint's global numbering (from the config, so it stays right
        when expert parallelism keeps only a shard of the experts on this rank)."""
        return int(getattr(model.config, self.layout.num_experts_key))

    def top_k(self, model: nn.Module) -> int:
        return int(getattr(model.config, self.layout.top_k_key))

    def router(self, block: nn.Module) -> nn.Module:
        return getattr(block, self.layout.router_attr)

    def router_weight(self, block: nn.Module) -> nn.Parameter:
        """The router's [E, H] weight (logits = hidden_TH @ weight_EH.T)."""
        return self.router(block).weight

    def router_bias(self, block: nn.Module) -> torch.Tensor | None:
        """The [E] expert-choice bias of aux-loss-free balancing, or None for families without one."""
        if self.layout.router_bias_attr is None:
            return None
        return getattr(self.router(block), self.layout.router_bias_attr)

    def experts(self, block: nn.Module) -> nn.Module:
        return getattr(block, self.layout.experts_attr)

    def shared_experts(self, block: nn.Module) -> nn.Module | None:
        """The always-on dense path beside the routed experts, or None."""
        attr = self.layout.shared_experts_attr
        return None if attr is None else getattr(block, attr)

    def shared_expert_gate(self, block: nn.Module) -> nn.Module | None:
        """The module scaling the shared expert's output per token (Qwen2-MoE: sigmoid of a [1, H] Linear)."""
        attr = self.layout.shared_expert_gate_attr
        return None if attr is None else getattr(block, attr)

    def expert_parameters(self, block: nn.Module) -> dict[str, nn.Parameter]:
        """The fused tensors of the routed experts, expert dimension 0, by short name (``gate_up_proj``, ...)."""
        experts = self.experts(block)
        return {name: getattr(experts, name) for name in self.layout.expert_param_names}

    # -- addressing ----------------------------------------------------------------------------------------------
    def empty_mask(self, model: nn.Module) -> ExpertMask:
        return ExpertMask.empty(self.num_layers(model), self.num_experts(model), self.moe_layers(model))

    def check_id(self, model: nn.Module, expert_id: Sequence[int]) -> ExpertId:
        return check_expert_id(expert_id, self.num_layers(model), self.num_experts(model), self.moe_layers(model))

    def _expert_slices(self, model: nn.Module, expert_id: Sequence[int]) -> dict[str, torch.Tensor]:
        layer, expert = self.check_id(model, expert_id)
        params = self.expert_parameters(self.moe_layers(model)[layer])
        num_experts = self.num_experts(model)
        for name, param in params.items():
            if param.shape[0] != num_experts:
                raise ExpertAddressError(
                    f"layer {layer} '{name}' holds {param.shape[0]} experts, the config says {num_experts}: this "
                    "module holds a shard of the experts (expert parallelism); read and write experts on the full "
                    "model"
                )
        return {name: param[expert] for name, param in params.items()}

    def read_expert(self, model: nn.Module, expert_id: Sequence[int]) -> dict[str, torch.Tensor]:
        """Copies of one expert's slices: ``gate_up_proj`` [2I, H], ``down_proj`` [H, I]."""
        return {name: t.detach().clone() for name, t in self._expert_slices(model, expert_id).items()}

    def write_expert(self, model: nn.Module, expert_id: Sequence[int], tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy ``tensors`` into one expert's slices in place. Names, shapes and dtypes must match exactly."""
        slices = self._expert_slices(model, expert_id)
        where = f"write_expert{tuple(self.check_id(model, expert_id))}"
        missing, extra = sorted(set(slices) - set(tensors)), sorted(set(tensors) - set(slices))
        if missing or extra:
            raise ExpertAddressError(
                f"{where}: missing tensors {missing}, unexpected tensors {extra}; expected exactly {sorted(slices)}"
            )
        for name, target in slices.items():
            source = tensors[name]
            if tuple(source.shape) != tuple(target.shape):
                raise ExpertAddressError(
                    f"{where}: '{name}' has shape {tuple(source.shape)}, expected {tuple(target.shape)}"
                )
            if source.dtype != target.dtype:
                raise ExpertAddressError(
                    f"{where}: '{name}' has dtype {source.dtype}, expected {target.dtype} (cast it first; "
                    "write_expert never changes precision silently)"
                )
        with torch.no_grad():
            for name, target in slices.items():
                target.copy_(tensors[name])

    def expert_param_slices(self, model: nn.Module) -> list[ExpertParamSlice]:
        """Every fused expert parameter with its full name and layer, for masking gradients slice by slice."""
        names = {id(p): n for n, p in model.named_parameters()}
        return [
            ExpertParamSlice(names[id(param)], param, layer, 0)
            for layer, block in self.moe_layers(model).items()
            for param in self.expert_parameters(block).values()
        ]

    def count_parameters(self, model: nn.Module) -> ParameterCount:
        """``non_expert + num_routed_experts * per_expert == model.num_parameters()``."""
        num_experts = self.num_experts(model)
        total = sum(p.numel() for p in model.parameters())
        per_layer = {
            layer: sum(p[0].numel() for p in self.expert_parameters(block).values())
            for layer, block in self.moe_layers(model).items()
        }
        if len(set(per_layer.values())) > 1:
            raise ExpertAddressError(f"routed experts differ in size across layers: {per_layer}")
        per_expert = next(iter(per_layer.values()), 0)
        num_routed = len(per_layer) * num_experts
        return ParameterCount(total - num_routed * per_expert, per_expert, num_routed)
