"""One MoE layer of a live model, in either layout: a plain transformers block or a DeepSpeed AutoEP layer.

:class:`MoEBlock` gives both the same face: the router's [E, H] weight, the choice bias, shared experts, which
global experts this process holds, and one expert read or written in the transformers form (``gate_up_proj``
[2I, H] gate rows first, ``down_proj`` [H, I]) whatever the storage. :class:`connito.experts.ExpertView` builds
one per MoE layer; nothing above it touches the storage directly.

Shape legend: E routed experts (global), H hidden size, I expert FFN width, N expert-parallel size.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from connito.experts.addressing import ExpertAddressError
from connito.experts.autoep_mapping import fuse_experts, split_experts
from connito.models.families import MoELayout

AUTOEP_LAYER_MODULE = "deepspeed.module_inject.auto_ep_layer"


def autoep_layer_class() -> type | None:
    """DeepSpeed's ``AutoEPMoELayer`` if DeepSpeed has loaded it, else None. A model can hold AutoEP layers only
    once that module is imported (``deepspeed.initialize`` imports it to swap them in), so this never imports
    DeepSpeed itself (which would fix its accelerator before the trainer chose one)."""
    module = sys.modules.get(AUTOEP_LAYER_MODULE)
    return None if module is None else module.AutoEPMoELayer


def check_materialized(param: torch.Tensor, what: str) -> None:
    """Refuse a parameter ZeRO-3 has partitioned away (its local data is empty, its shape in ``ds_shape``)."""
    ds_shape = getattr(param, "ds_shape", None)
    if ds_shape is not None and tuple(param.shape) != tuple(ds_shape):
        raise ExpertAddressError(
            f"{what} is partitioned by ZeRO-3 (engine.zero_stage=3): this rank holds none of it. Read or write "
            "experts inside `with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):`, "
            "or train with engine.zero_stage 0, 1 or 2"
        )


@dataclass(frozen=True)
class ExpertParamSlice:
    """A stacked expert parameter: index ``i`` of dimension ``expert_dim`` is global expert ``first_expert + i`` of
    decoder layer ``layer``. Gradient masks and optimizer hooks slice it."""

    name: str
    param: nn.Parameter
    layer: int
    expert_dim: int
    first_expert: int

    @property
    def experts(self) -> range:
        return range(self.first_expert, self.first_expert + self.param.shape[self.expert_dim])


class MoEBlock(ABC):
    """One MoE layer. Subclasses know the storage; this class holds what both layouts share."""

    module: nn.Module
    prefix: str
    num_experts: int
    ep_rank: int = 0
    ep_size: int = 1

    @property
    def local_experts(self) -> range:
        """Global ids of the routed experts this process holds."""
        per_rank = self.num_experts // self.ep_size
        return range(self.ep_rank * per_rank, (self.ep_rank + 1) * per_rank)

    def owner(self, expert: int) -> int:
        """The expert-parallel rank (within the group) holding global expert ``expert``."""
        return expert // (self.num_experts // self.ep_size)

    # -- overridden per layout -----------------------------------------------------------------------------------
    router_module: nn.Module
    """The module whose forward routes (a forward hook on it sees the routing decision)."""
    ep_group = None

    @abstractmethod
    def router_weight(self) -> nn.Parameter:
        """The live [E, H] router weight (``logits_TE = hidden_TH @ weight_EH.T``); every rank holds all of it."""
        ...

    @abstractmethod
    def choice_bias(self) -> torch.Tensor | None: ...

    @abstractmethod
    def shared_experts(self) -> nn.Module | None: ...

    @abstractmethod
    def shared_expert_gate(self) -> nn.Module | None: ...

    @abstractmethod
    def stacked_params(self) -> dict[str, nn.Parameter]:
        """The stacked expert parameters this process holds, expert dimension 0, by storage name."""
        ...

    @abstractmethod
    def _read_local(self, local: int) -> dict[str, torch.Tensor]: ...

    @abstractmethod
    def _write_local(self, local: int, tensors: Mapping[str, torch.Tensor]) -> None: ...

    # -- shared --------------------------------------------------------------------------------------------------
    def _local_index(self, expert: int) -> int:
        if expert not in self.local_experts:
            raise ExpertAddressError(
                f"expert {expert} of {self.prefix} lives on expert-parallel rank {self.owner(expert)}, not on this "
                f"rank ({self.ep_rank}); use ExpertView.read_expert on every rank of the group"
            )
        for name, param in self.stacked_params().items():
            check_materialized(param, f"{self.prefix} '{name}'")
        return expert - self.local_experts.start

    def read_local(self, expert: int) -> dict[str, torch.Tensor]:
        """Copies of a held expert's tensors in transformers form: ``gate_up_proj`` [2I, H], ``down_proj`` [H, I]."""
        return {name: t.detach().clone() for name, t in self._read_local(self._local_index(expert)).items()}

    def write_local(self, expert: int, tensors: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self._write_local(self._local_index(expert), tensors)

    def expert_shapes(self) -> tuple[dict[str, tuple[int, ...]], torch.dtype]:
        """Shapes of one expert in transformers form, and the experts' dtype."""
        params = self.stacked_params()
        for name, param in params.items():
            check_materialized(param, f"{self.prefix} '{name}'")
        one = self._read_local(0)
        return {name: tuple(t.shape) for name, t in one.items()}, next(iter(params.values())).dtype

    def param_slices(self, layer: int, names: dict[int, str]) -> list[ExpertParamSlice]:
        return [
            ExpertParamSlice(names[id(param)], param, layer, 0, self.local_experts.start)
            for param in self.stacked_params().values()
        ]


class HFMoEBlock(MoEBlock):
    """A transformers block: ``<router>.weight`` [E, H], ``<experts>.gate_up_proj`` [E, 2I, H], ``down_proj``."""

    def __init__(self, module: nn.Module, prefix: str, layout: MoELayout, num_experts: int):
        self.module, self.prefix, self.layout, self.num_experts = module, prefix, layout, num_experts
        self.router_module = getattr(module, layout.router_attr)
        self.experts_module = getattr(module, layout.experts_attr)

    @staticmethod
    def matches(module: nn.Module, layout: MoELayout) -> bool:
        experts = getattr(module, layout.experts_attr, None)
        return (
            isinstance(experts, nn.Module)
            and isinstance(getattr(module, layout.router_attr, None), nn.Module)
            and all(isinstance(getattr(experts, n, None), nn.Parameter) for n in ("gate_up_proj", "down_proj"))
        )

    def router_weight(self) -> nn.Parameter:
        return self.router_module.weight

    def choice_bias(self) -> torch.Tensor | None:
        attr = self.layout.router_bias_attr
        return None if attr is None else getattr(self.router_module, attr)

    def shared_experts(self) -> nn.Module | None:
        attr = self.layout.shared_experts_attr
        return None if attr is None else getattr(self.module, attr)

    def shared_expert_gate(self) -> nn.Module | None:
        attr = self.layout.shared_expert_gate_attr
        return None if attr is None else getattr(self.module, attr)

    def stacked_params(self) -> dict[str, nn.Parameter]:
        return {"gate_up_proj": self.experts_module.gate_up_proj, "down_proj": self.experts_module.down_proj}

    def _read_local(self, local: int) -> dict[str, torch.Tensor]:
        return {name: param[local] for name, param in self.stacked_params().items()}

    def _write_local(self, local: int, tensors: Mapping[str, torch.Tensor]) -> None:
        for name, param in self.stacked_params().items():
            param[local].copy_(tensors[name])

    def set_num_experts(self, num_experts: int) -> None:
        """After the router's rows changed: keep the modules' own expert counts in step."""
        self.num_experts = num_experts
        for module in (self.router_module, self.experts_module):
            if hasattr(module, "num_experts"):
                module.num_experts = num_experts


class AutoEPMoEBlock(MoEBlock):
    """A DeepSpeed ``AutoEPMoELayer``: ``router.gate`` (an ``nn.Linear``), the local shard ``experts.w1/w3``
    [E/N, I, H] and ``experts.w2`` [E/N, H, I] of global experts ``[r * E/N, (r + 1) * E/N)``."""

    def __init__(self, module: nn.Module, prefix: str, layout: MoELayout):
        from deepspeed.checkpoint.autoep_affine import autoep_experts_for_rank

        self.module, self.prefix, self.layout = module, prefix, layout
        self.num_experts, self.ep_rank, self.ep_size = module.num_experts, module.ep_rank, module.ep_size
        self.router_module = module.router
        self.ep_group = module.ep_group
        held = list(autoep_experts_for_rank(module.expert_placement_descriptor, module.ep_rank))
        if held != list(self.local_experts):
            raise ExpertAddressError(
                f"AutoEP layer {prefix} places experts {held} on ep rank {module.ep_rank}; Connito addresses the "
                f"uniform contiguous placement {list(self.local_experts)} only"
            )

    def router_weight(self) -> nn.Parameter:
        return self.module.router.gate.weight

    def choice_bias(self) -> torch.Tensor | None:
        return getattr(self.module.router, "e_score_correction_bias", None)

    def shared_experts(self) -> nn.Module | None:
        return self.module.shared_experts

    def shared_expert_gate(self) -> nn.Module | None:
        return self.module.shared_experts_gate

    def stacked_params(self) -> dict[str, nn.Parameter]:
        experts = self.module.experts
        return {"w1": experts.w1, "w2": experts.w2, "w3": experts.w3}

    def _read_local(self, local: int) -> dict[str, torch.Tensor]:
        experts = self.module.experts
        return fuse_experts(experts.w1[local], experts.w3[local], experts.w2[local])

    def _write_local(self, local: int, tensors: Mapping[str, torch.Tensor]) -> None:
        parts = split_experts(tensors["gate_up_proj"], tensors["down_proj"])
        for name, param in self.stacked_params().items():
            param[local].copy_(parts[name])
