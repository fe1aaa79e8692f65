"""The records the retirement commands write, one class per kind (each a
:class:`~connito.common.records.JsonRecord`: the fields are the file's keys in the file's order, JSON indented by 1
with a final newline; ``load`` refuses another kind or version naming the file and the fix; ``save`` is atomic):

* ``prune_report.json`` (``connito.prune/1``, ``connito prune``): the experts kept and removed per layer and
  their scores (``calibration`` with REAP), the held-out loss before and after (``validation_loss``, when measured);
* ``merge_report.json`` (``connito.merge/1``, ``connito merge``): the merge groups, their usage shares and the
  experts kept;
* ``share_report.json`` (``connito.share_report/1``, ``connito share``): the experts moved into each layer's shared
  expert and the distillation's MSE;
* ``connito_share.json`` (``connito.share/1``) beside the shared checkpoint's weights: how each layer's shared
  expert was built (:func:`connito.retirement.sharing.share_checkpoint`);
* ``progressive_prune.json`` (``connito.progressive_prune/1``) in a run directory: the progressive-pruning
  callback's schedule and which experts are left (:class:`connito.retirement.progressive.ProgressivePrune`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from connito.common.records import JsonRecord


class _Report(JsonRecord):
    INDENT: ClassVar[int | None] = 1
    FILE: ClassVar[str]


@dataclass(frozen=True, kw_only=True)
class PruneReport(_Report):
    """``prune_report.json``; ``kept`` maps a MoE layer (a string) to the old ids of its experts kept."""

    SCHEMA: ClassVar[str] = "connito.prune/1"
    FILE: ClassVar[str] = "prune_report.json"
    WHAT: ClassVar[str] = "pruning report"
    FIX: ClassVar[str] = "prune again with `connito prune`"
    OMIT_IF_NONE: ClassVar[frozenset[str]] = frozenset({"calibration", "validation_loss"})

    checkpoint: str
    keep: int
    score: str
    kept: Mapping[str, list[int]]
    removed: Sequence[list[int]]
    scores: Sequence[Sequence[float]]
    calibration: Mapping[str, Any] | None = None
    """REAP's calibration text: ``split``, ``domains``, ``tokens``."""
    validation_loss: Mapping[str, Mapping[str, float]] | None = None


@dataclass(frozen=True, kw_only=True)
class MergeReport(_Report):
    """``merge_report.json``: ``groups`` as ``[layer, expert, ...]`` (the first the merged slot)."""

    SCHEMA: ClassVar[str] = "connito.merge/1"
    FILE: ClassVar[str] = "merge_report.json"
    WHAT: ClassVar[str] = "expert-merge report"
    FIX: ClassVar[str] = "merge again with `connito merge`"
    OMIT_IF_NONE: ClassVar[frozenset[str]] = frozenset({"validation_loss"})

    checkpoint: str
    keep: int | None
    similarity: str | None
    frequency: str
    groups: Sequence[list[int]]
    shares: Sequence[list[float]]
    kept: Mapping[str, list[int]]
    validation_loss: Mapping[str, Mapping[str, float]] | None = None


@dataclass(frozen=True, kw_only=True)
class ShareReport(_Report):
    """``share_report.json``."""

    SCHEMA: ClassVar[str] = "connito.share_report/1"
    FILE: ClassVar[str] = "share_report.json"
    WHAT: ClassVar[str] = "shared-expert report"
    FIX: ClassVar[str] = "build the shared expert again with `connito share`"
    OMIT_IF_NONE: ClassVar[frozenset[str]] = frozenset({"validation_loss"})

    checkpoint: str
    pick: str
    per_layer: int
    shared_from: Mapping[str, list[int]]
    distillation_mse: Mapping[str, Any]
    validation_loss: Mapping[str, Mapping[str, float]] | None = None


@dataclass(frozen=True, kw_only=True)
class ShareRecord(_Report):
    """``connito_share.json`` beside a shared checkpoint's weights."""

    SCHEMA: ClassVar[str] = "connito.share/1"
    FILE: ClassVar[str] = "connito_share.json"
    WHAT: ClassVar[str] = "shared-expert provenance record"
    FIX: ClassVar[str] = "build the shared expert again with `connito share`"

    source: str
    pick: str
    domains: Sequence[str]
    shared_from: Mapping[str, list[int]]
    merge_weights: Mapping[str, Any]
    scale: Mapping[str, Any]
    distillation: Mapping[str, Any]
    """``steps``, ``lr`` and ``mse`` per layer (before, after)."""


@dataclass(frozen=True, kw_only=True)
class ProgressivePruneRecord(_Report):
    """``progressive_prune.json``: ``alive_mask`` is [MoE layer][expert] 0/1, ``windows`` the schedule's history."""

    SCHEMA: ClassVar[str] = "connito.progressive_prune/1"
    FILE: ClassVar[str] = "progressive_prune.json"
    WHAT: ClassVar[str] = "progressive-pruning record"
    FIX: ClassVar[str] = "point at the progressive_prune.json of a run with callbacks.progressive_prune"

    options: Mapping[str, Any]
    train_steps: int
    num_windows: int
    windows_done: int
    moe_layers: Sequence[int]
    num_experts: int
    top_k: int
    windows: Sequence[Mapping[str, Any]]
    alive_mask: Sequence[Sequence[int]]
    kept: Mapping[str, list[int]]
    pruned_dir: str | None
