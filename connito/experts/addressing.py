"""How Connito names experts: one expert is ``(layer, expert)``, a set of experts is a boolean [L, E] mask.

Both use the *global* numbering of the checkpoint: ``layer`` is the decoder layer index (0-based, dense layers
included, so layer numbers match ``model.model.layers[i]``), ``expert`` is the routed expert index inside that
layer's MoE block, whatever expert-parallel layout holds the weights at run time. Shared experts are not
addressed here: they are always on and belong to the non-expert part of the model.

Shape legend: L decoder layers, E routed experts per MoE layer.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch


class ExpertAddressError(ValueError):
    """An expert address (or a mask) that does not fit the model; the message says what does."""


class ExpertId(NamedTuple):
    """One routed expert: decoder layer index and expert index, both in the checkpoint's global numbering."""

    layer: int
    expert: int


def check_expert_id(expert_id: Sequence[int], num_layers: int, num_experts: int, moe_layers: Sequence[int]) -> ExpertId:
    """Return ``expert_id`` as an :class:`ExpertId`, or raise :class:`ExpertAddressError` saying what is wrong."""
    if len(expert_id) != 2:
        raise ExpertAddressError(f"an expert id is (layer, expert), got {tuple(expert_id)!r}")
    layer, expert = (int(i) for i in expert_id)
    if not 0 <= layer < num_layers:
        raise ExpertAddressError(
            f"layer {layer} is out of range: the model has {num_layers} decoder layers (0..{num_layers - 1})"
        )
    if layer not in moe_layers:
        raise ExpertAddressError(
            f"layer {layer} is a dense layer (no MoE block); the MoE layers are {sorted(moe_layers)}"
        )
    if not 0 <= expert < num_experts:
        raise ExpertAddressError(
            f"expert {expert} is out of range: layer {layer} has {num_experts} routed experts (0..{num_experts - 1})"
        )
    return ExpertId(layer, expert)


class ExpertMask:
    """A set of routed experts as a boolean tensor ``mask_LE`` [num_layers, num_experts].

    Rows of dense layers (no MoE block, e.g. DeepSeek's first ``first_k_dense_replace`` layers) exist so that row
    index == layer index, and are always all False: setting a dense layer's expert is refused.
    Masks are values: set operations return new masks, ``set``/``clear`` change this one.
    """

    def __init__(self, mask_LE: torch.Tensor, moe_layers: Iterable[int]):
        if mask_LE.dim() != 2 or mask_LE.dtype != torch.bool:
            raise ExpertAddressError(
                f"an expert mask is a 2-D bool tensor [layers, experts], got {mask_LE.dtype} of shape "
                f"{tuple(mask_LE.shape)}"
            )
        self._mask_LE = mask_LE.detach().to("cpu", copy=True)
        self.moe_layers: tuple[int, ...] = tuple(sorted({int(i) for i in moe_layers}))
        num_layers = self._mask_LE.shape[0]
        for layer in self.moe_layers:
            if not 0 <= layer < num_layers:
                raise ExpertAddressError(
                    f"MoE layer {layer} is out of range: the mask has {num_layers} layers (0..{num_layers - 1})"
                )
        dense = [i for i in range(num_layers) if i not in self.moe_layers and bool(self._mask_LE[i].any())]
        if dense:
            raise ExpertAddressError(
                f"layer {dense[0]} is a dense layer (no MoE block); the MoE layers are {list(self.moe_layers)}"
            )

    # -- construction ------------------------------------------------------------------------------------------
    @classmethod
    def empty(cls, num_layers: int, num_experts: int, moe_layers: Iterable[int]) -> ExpertMask:
        return cls(torch.zeros(num_layers, num_experts, dtype=torch.bool), moe_layers)

    @classmethod
    def full(cls, num_layers: int, num_experts: int, moe_layers: Iterable[int]) -> ExpertMask:
        """Every routed expert of every MoE layer."""
        return ~cls.empty(num_layers, num_experts, moe_layers)

    @classmethod
    def from_ids(
        cls, ids: Iterable[Sequence[int]], num_layers: int, num_experts: int, moe_layers: Iterable[int]
    ) -> ExpertMask:
        mask = cls.empty(num_layers, num_experts, moe_layers)
        for expert_id in ids:
            mask.set(expert_id)
        return mask

    # -- shape and contents ------------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        return (self._mask_LE.shape[0], self._mask_LE.shape[1])

    @property
    def mask_LE(self) -> torch.Tensor:
        """A copy of the boolean tensor [L, E]."""
        return self._mask_LE.clone()

    def check(self, expert_id: Sequence[int]) -> ExpertId:
        return check_expert_id(expert_id, self.shape[0], self.shape[1], self.moe_layers)

    def set(self, expert_id: Sequence[int], value: bool = True) -> None:
        layer, expert = self.check(expert_id)
        self._mask_LE[layer, expert] = value

    def clear(self, expert_id: Sequence[int]) -> None:
        self.set(expert_id, False)

    def ids(self) -> list[ExpertId]:
        """The experts in the mask, sorted by (layer, expert)."""
        return [ExpertId(int(lay), int(exp)) for lay, exp in self._mask_LE.nonzero().tolist()]

    def __contains__(self, expert_id: object) -> bool:
        layer, expert = expert_id  # type: ignore[misc]
        return bool(self._mask_LE[self.check((layer, expert))])

    def __len__(self) -> int:
        return int(self._mask_LE.sum())

    def __iter__(self):
        return iter(self.ids())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ExpertMask):
            return NotImplemented
        return self.moe_layers == other.moe_layers and torch.equal(self._mask_LE, other._mask_LE)

    def __repr__(self) -> str:
        return f"ExpertMask(shape={self.shape}, moe_layers={list(self.moe_layers)}, ids={self.ids()})"

    # -- set operations ----------------------------------------------------------------------------------------
    def _same_space(self, other: ExpertMask) -> None:
        if not isinstance(other, ExpertMask):
            raise TypeError(f"expected an ExpertMask, got {type(other).__name__}")
        if self.shape != other.shape or self.moe_layers != other.moe_layers:
            raise ExpertAddressError(
                f"expert masks of different models: shape {self.shape} with MoE layers {list(self.moe_layers)} vs "
                f"shape {other.shape} with MoE layers {list(other.moe_layers)}"
            )

    def __or__(self, other: ExpertMask) -> ExpertMask:
        self._same_space(other)
        return ExpertMask(self._mask_LE | other._mask_LE, self.moe_layers)

    def __and__(self, other: ExpertMask) -> ExpertMask:
        self._same_space(other)
        return ExpertMask(self._mask_LE & other._mask_LE, self.moe_layers)

    def __sub__(self, other: ExpertMask) -> ExpertMask:
        self._same_space(other)
        return ExpertMask(self._mask_LE & ~other._mask_LE, self.moe_layers)

    def __xor__(self, other: ExpertMask) -> ExpertMask:
        self._same_space(other)
        return ExpertMask(self._mask_LE ^ other._mask_LE, self.moe_layers)

    def __invert__(self) -> ExpertMask:
        """The complement among routed experts (dense layers stay empty)."""
        moe_rows_L = torch.zeros(self.shape[0], dtype=torch.bool)
        moe_rows_L[list(self.moe_layers)] = True
        return ExpertMask(~self._mask_LE & moe_rows_L[:, None], self.moe_layers)

    # -- JSON --------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """``{"shape": [L, E], "moe_layers": [...], "experts": {"<layer>": [expert, ...]}}``, one entry per MoE
        layer (empty lists included), so the file reads as a table of what each layer keeps."""
        experts = {str(layer): self._mask_LE[layer].nonzero().flatten().tolist() for layer in self.moe_layers}
        return {"shape": list(self.shape), "moe_layers": list(self.moe_layers), "experts": experts}

    def to_json(self, **json_kwargs) -> str:
        return json.dumps(self.to_dict(), **json_kwargs)

    @classmethod
    def from_dict(cls, data: dict) -> ExpertMask:
        missing = [key for key in ("shape", "moe_layers", "experts") if key not in data]
        if missing:
            raise ExpertAddressError(f"expert mask JSON is missing {missing}; it needs shape, moe_layers, experts")
        shape = data["shape"]
        if len(shape) != 2 or any(not isinstance(n, int) or n < 1 for n in shape):
            raise ExpertAddressError(f"expert mask JSON 'shape' must be [layers, experts] (positive), got {shape!r}")
        mask = cls.empty(shape[0], shape[1], data["moe_layers"])
        for layer, experts in data["experts"].items():
            try:
                layer_index = int(layer)
            except ValueError:
                raise ExpertAddressError(f"expert mask JSON layer keys are integers, got {layer!r}") from None
            for expert in experts:
                mask.set((layer_index, expert))
        return mask

    @classmethod
    def from_json(cls, text: str) -> ExpertMask:
        return cls.from_dict(json.loads(text))
