"""Lean expert storage: the trainable experts of a fused expert tensor as a compact parameter of their own.

A transformers MoE layer keeps its routed experts fused, ``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I]
(AutoEP: ``w1``/``w3`` [E/N, I, H] and ``w2`` [E/N, H, I] per rank). A gradient mask on such a tensor still pays for
all E experts: a gradient buffer, AdamW moments and the weight-gradient GEMM of every expert. :class:`LeanSlots`
holds instead, per MoE layer that trains some but not all of its experts, the trainable experts alone:

* ``gate_up_proj`` [G, 2I, H] and ``down_proj`` [G, H, I]: slot g is global expert ``global_ids[g]`` (the experts this
  rank holds under expert parallelism), in the family's own transformers form; these are the only trainable
  expert parameters of the layer, so the optimizer (torch AdamW at ZeRO 0, DeepSpeed's flat partitions at ZeRO 1/2)
  holds state for them alone;
* the fused tensors keep every expert and are frozen (``requires_grad=False``): they are what the forward reads and
  what ``state_dict``/``save_pretrained`` write. :func:`sync` copies the slots into their rows (``index_copy_``):
  after every optimizer step of Connito's trainer (DeepSpeed saves AutoEP's expert shards straight from the
  parameters), before every forward through the lean experts forward, before every ``state_dict()`` of the model or
  of an experts module, and when an :class:`connito.experts.ExpertView` is made. So the fused tensors show the
  trained values wherever they are read, and the frozen rows are never written at all.

Under expert parallelism every rank of a layer holds the same number of slots G (the most trainable experts any
rank of the layer holds; a rank with fewer keeps zero padding slots, ``global_ids[g] = -1``, that never get a
gradient), so every rank builds the same optimizer groups, as DeepSpeed needs; the slots are marked as expert
parameters (``allreduce=False``, ``group_name="ep_size_<N>"``) so their gradients are reduced over the
expert-data-parallel group only.

The slots live on the decoder layer (``<layer>.lean_experts``), outside the MoE block AutoEP replaces, and leave the
``state_dict`` (a post-hook drops their keys; on load a post-hook takes them from the loaded fused rows), so
checkpoints and exports stay in the family's format.

Shape legend: E routed experts, G slots (trainable experts held here), H hidden size, I expert FFN width,
N expert-parallel size.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator

import torch
from torch import nn

LEAN_ATTR = "lean_experts"
"""Attribute of a decoder layer holding its :class:`LeanSlots`."""

_EXPERTS_OF: weakref.WeakKeyDictionary[nn.Module, LeanSlots] = weakref.WeakKeyDictionary()
"""experts module (transformers ``<Family>Experts`` or AutoEP's ``GroupedExperts``) -> its slots."""


class LeanSlots(nn.Module):
    """One MoE layer's trainable experts as compact parameters; see the module docstring."""

    def __init__(self, layer: int, held: range, global_ids: list[int], local_ids: list[int], gate_up_GFH, down_GHI):
        super().__init__()
        self.layer = layer
        self.held = held
        """Global ids of the experts this rank holds in the layer (all of them at ep 1)."""
        self.global_ids = list(global_ids)
        """Global expert id of each slot; -1 for a padding slot (expert parallelism)."""
        self.local_ids = list(local_ids)
        """Index in this rank's fused tensors of each real slot (the first ``len(local_ids)`` slots)."""
        self.gate_up_proj = nn.Parameter(gate_up_GFH)
        self.down_proj = nn.Parameter(down_GHI)
        self.targets: list[tuple[torch.Tensor, str, slice | None]] = []
        """(fused tensor, slot parameter name, rows of the slot tensor it takes) written by :meth:`sync`."""
        self._index: torch.Tensor | None = None
        self._state_hook = None
        self._register_state_dict_hook(_drop_own_keys)

    @property
    def num_real(self) -> int:
        return len(self.local_ids)

    @property
    def experts_G(self) -> torch.Tensor:
        """The local indices of the real slots, on the slots' device (the experts whose weight gradient is wanted)."""
        if self._index is None or self._index.device != self.gate_up_proj.device:
            self._index = torch.tensor(self.local_ids, dtype=torch.long, device=self.gate_up_proj.device)
        return self._index

    def bind(self, experts_module: nn.Module, fused: dict[str, torch.Tensor]) -> None:
        """Point the slots at the fused tensors they write: transformers' ``gate_up_proj``/``down_proj`` or AutoEP's
        ``w1``/``w3``/``w2`` (gate, up, down)."""
        width = self.down_proj.shape[-1]
        if "gate_up_proj" in fused:
            self.targets = [(fused["gate_up_proj"], "gate_up_proj", None), (fused["down_proj"], "down_proj", None)]
        else:
            self.targets = [
                (fused["w1"], "gate_up_proj", slice(0, width)),
                (fused["w3"], "gate_up_proj", slice(width, 2 * width)),
                (fused["w2"], "down_proj", None),
            ]
        _EXPERTS_OF[experts_module] = self
        # Whoever reads the fused tensors through a state_dict sees the trained values: also a state_dict of the
        # experts module or an ancestor below the root (DeepSpeed saves AutoEP's expert shards that way).
        if self._state_hook is not None:
            self._state_hook.remove()
        self._state_hook = experts_module.register_state_dict_pre_hook(self._sync_hook)

    def _sync_hook(self, module, prefix, keep_vars) -> None:
        self.sync()

    def bound_to(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` is the first fused tensor the slots write (a forward run with substituted parameters,
        as :func:`torch.func.functional_call` does, sees another tensor)."""
        return bool(self.targets) and self.targets[0][0] is tensor

    @torch.no_grad()
    def sync(self) -> None:
        """Write the real slots into their rows of the fused tensors (nothing else is written)."""
        if not self.num_real:
            return
        for fused, name, rows in self.targets:
            values = getattr(self, name)[: self.num_real]
            if rows is not None:
                values = values[:, rows]
            # through .data: no version bump, so a forward's saved tensors stay valid for its backward (the values
            # of those rows only change after an optimizer step, when every backward that read them is done)
            fused.data.index_copy_(0, self.experts_G.to(fused.device), values.detach().to(fused.dtype))

    @torch.no_grad()
    def take_from_fused(self) -> None:
        """The inverse of :meth:`sync`: set the real slots from the fused rows (after a ``load_state_dict``)."""
        if not self.num_real:
            return
        for fused, name, rows in self.targets:
            slot = getattr(self, name)[: self.num_real]
            values = fused.index_select(0, self.experts_G.to(fused.device))
            (slot if rows is None else slot[:, rows]).copy_(values)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, experts={self.global_ids}"


def _drop_own_keys(module, state_dict, prefix, local_metadata):
    for key in [k for k in state_dict if k.startswith(prefix)]:
        del state_dict[key]
    return state_dict


def slots_of(experts_module: nn.Module) -> LeanSlots | None:
    """The slots bound to an experts module, if any."""
    return _EXPERTS_OF.get(experts_module)


def lean_slots(model: nn.Module) -> Iterator[LeanSlots]:
    for module in model.modules():
        if isinstance(module, LeanSlots):
            yield module


def sync(model: nn.Module) -> None:
    """Write every layer's trained slots into the fused tensors (a no-op on a model without lean experts)."""
    for slots in lean_slots(model):
        slots.sync()


def _slots_from_loaded(module, incompatible_keys):
    """After ``load_state_dict``: the slots are not in checkpoints; take them from the loaded fused rows."""
    own = {
        f"{name}.{p}" for name, m in module.named_modules() if isinstance(m, LeanSlots) for p, _ in m.named_parameters()
    }
    incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if k not in own]
    for slots in lean_slots(module):
        slots.take_from_fused()


def attach_model_hooks(model: nn.Module) -> list:
    """On the root model: fill the slots after every ``load_state_dict()``. (Every ``state_dict()`` that reaches a
    bound experts module syncs through that module's own pre-hook, :meth:`LeanSlots.bind`.)"""
    return [model.register_load_state_dict_post_hook(_slots_from_loaded)]
