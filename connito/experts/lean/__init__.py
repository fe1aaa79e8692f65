"""Lean experts: the trainable experts of a fused expert tensor as compact parameters of their own, so frozen experts
cost no weight gradient and no optimizer state (:mod:`.slots` the storage, :mod:`.install` putting it into a model,
:mod:`.forward` the experts forward and backward through it)."""

from connito.experts.lean.slots import LeanSlots, lean_slots, slots_of, sync

__all__ = ["LeanSlots", "lean_slots", "slots_of", "sync"]
