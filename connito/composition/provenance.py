"""The provenance records a composition writes beside the checkpoint's weights, one class per kind.

* ``connito_btx.json`` (``connito.btx/1``): :func:`connito.composition.btx_merge.merge_branches`;
* ``connito_bam.json`` (``connito.bam/1``): :func:`connito.composition.bam_merge.merge_bam` (BTX's keys, then
  ``attention``);
* ``connito_flexolmo.json`` (``connito.flexolmo/1``): :func:`connito.composition.flexolmo.owner_start` (role
  ``owner_start``) and ``merge_owners`` (role ``merged``);
* ``connito_bts.json`` (``connito.bts/1``): :func:`connito.composition.bts_stitch.stitch_branches` (with
  ``opted_out`` once branches were opted out);
* ``connito_groups.json`` (``connito.groups/1``): :func:`connito.composition.expert_groups.merge.merge_groups`.

Each is a :class:`~connito.common.records.JsonRecord`: the fields are the file's keys in the file's order (JSON
indented by 2, a final newline), ``load`` refuses another kind or version naming the file and the fix, ``save``
writes atomically. The nested sections (``seed``, ``router``, ...) stay mappings: they are descriptive, and
readers take what they need by attribute from the top level.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from connito.common.records import JsonRecord

BTX_FILE, BAM_FILE = "connito_btx.json", "connito_bam.json"
FLEXOLMO_FILE, BTS_FILE, GROUPS_FILE = "connito_flexolmo.json", "connito_bts.json", "connito_groups.json"


class _Provenance(JsonRecord):
    FILE: ClassVar[str]

    @classmethod
    def load(cls, path: str | Path):
        """The record at ``path``: the file, or the checkpoint directory holding :attr:`FILE`."""
        path = Path(path).expanduser()
        return super().load(path / cls.FILE if path.is_dir() else path)


@dataclass(frozen=True, kw_only=True)
class BtxRecord(_Provenance):
    """``connito_btx.json``: the seed and branches (path, fingerprint), the merge's options and each expert."""

    SCHEMA: ClassVar[str] = "connito.btx/1"
    FILE: ClassVar[str] = BTX_FILE
    WHAT: ClassVar[str] = "BTX provenance record"
    FIX: ClassVar[str] = "merge the branches again with `connito btx` (merge_branches)"

    method: str
    seed: Mapping[str, Any]
    branches: Sequence[Mapping[str, Any]]
    options: Mapping[str, Any]
    experts: Sequence[str]
    shared_expert: str | None
    router: Mapping[str, Any]
    created: str


@dataclass(frozen=True, kw_only=True)
class BamRecord(BtxRecord):
    """``connito_bam.json``: BTX's record of the FFN experts (its fields, in its order), then the attention
    experts."""

    SCHEMA: ClassVar[str] = "connito.bam/1"
    FILE: ClassVar[str] = BAM_FILE
    WHAT: ClassVar[str] = "BAM provenance record"
    FIX: ClassVar[str] = "upcycle the branches again with `connito btx method=bam` (merge_bam)"

    attention: Mapping[str, Any]


@dataclass(frozen=True, kw_only=True)
class FlexOlmoRecord(_Provenance):
    """``connito_flexolmo.json`` of an owner's start (``role="owner_start"``: ``train`` says what the owner
    trains) or of the merge (``role="merged"``: ``public_expert`` and ``owners``, ``{name: {expert, path,
    fingerprint}}``)."""

    SCHEMA: ClassVar[str] = "connito.flexolmo/1"
    FILE: ClassVar[str] = FLEXOLMO_FILE
    WHAT: ClassVar[str] = "FlexOlmo provenance record"
    FIX: ClassVar[str] = "start the owner again with owner_start (or merge again with merge_owners)"
    OMIT_IF_NONE: ClassVar[frozenset[str]] = frozenset({"public_expert", "owners", "train"})

    role: str
    method: str
    public: Mapping[str, Any]
    """``path`` and ``fingerprint`` of the public checkpoint (and its shape)."""
    family: str
    public_expert: int | None = None
    owners: Mapping[str, Mapping[str, Any]] | None = None
    experts: Sequence[str]
    router: Mapping[str, Any]
    train: Mapping[str, Any] | None = None
    created: str


@dataclass(frozen=True, kw_only=True)
class BtsRecord(_Provenance):
    """``connito_bts.json``: the hub and the named branches, where the stitches are, and the branches opted out."""

    SCHEMA: ClassVar[str] = "connito.bts/1"
    FILE: ClassVar[str] = BTS_FILE
    WHAT: ClassVar[str] = "BTS provenance record"
    FIX: ClassVar[str] = "stitch the branches again with stitch_branches"
    OMIT_IF_NONE: ClassVar[frozenset[str]] = frozenset({"opted_out"})

    method: str
    hub: Mapping[str, Any]
    branches: Sequence[Mapping[str, Any]]
    stitch_every: int
    stitches_after_layers: Sequence[int]
    init: str
    created: str
    opted_out: Sequence[str] | None = None


@dataclass(frozen=True, kw_only=True)
class GroupsRecord(_Provenance):
    """``connito_groups.json``: the base, each delta package merged (its experts and modules) and the validation
    the merge ran on the written checkpoint (None: none)."""

    SCHEMA: ClassVar[str] = "connito.groups/1"
    FILE: ClassVar[str] = GROUPS_FILE
    WHAT: ClassVar[str] = "groups provenance record"
    FIX: ClassVar[str] = "merge the groups again with `connito groups` (merge_groups)"

    method: str
    base: Mapping[str, Any]
    packages: Mapping[str, Mapping[str, Any]]
    overlap: str
    overlaps: Mapping[str, Any]
    dtype: str
    validation: Mapping[str, Any] | None
    created: str
