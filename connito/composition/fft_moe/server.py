"""FFT-MoE's server side: a client's update as a verified delta package, what the server accepts, and aggregation.

A client's update for one round is a folder::

    <update>/adapters/     a connito.delta/1 package (:mod:`connito.experts.delta`) of the adapters' tensors as
                           modules (``model.layers.<l>.mlp_adapter...``), fingerprinted against the frozen base
    <update>/update.json   {"schema": "connito.fft_moe.update/1", "client": name, "num_examples": |D_n|,
                            "top_k": budget, "layers": [...], "tokens_per_expert": [[...] per adapter layer]}

**Acceptance** (:func:`accept_update`): the package must pass :func:`connito.experts.delta.load_delta` (manifest,
sha256 of every file, tensor names, shapes and dtypes), carry the base's fingerprint, hold the adapter tensors the
server expects (the global adapters' names and shapes) and only finite values. Anything else is refused with an
:class:`UpdateRefused` naming the client and the reason; :func:`aggregate_round` stops on the first refusal unless
``skip_refused`` (then the round goes on without that client, and the refusal is recorded).

**Aggregation** (:func:`aggregate`), the paper's ``W_E^g = sum_n |D_n|/|D| W_E^n`` taken per expert over the clients
that trained it: for every adapter expert ``(l, m)`` with ``S = {n : client n routed a token to (l, m)}``::

    W_(l,m) = sum_{n in S} |D_n| * W^n_(l,m) / sum_{n in S} |D_n|     (S empty: the previous global value stays)

Routers are not averaged: each client keeps its own (``routers[client]``). The next round's start for client n is
the global experts plus client n's router (:func:`client_start`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import save_file

import connito
from connito.common.atomic import atomic_write_text
from connito.common.records import JsonRecord, RecordError
from connito.experts.addressing import ExpertMask
from connito.experts.delta import DeltaError, DeltaManifest, load_delta
from connito.experts.delta.manifest import MANIFEST_FILE, MODULES_FILE, TensorEntry, dtype_name, file_sha256, module_key
from connito.experts.delta.package import comparable_config
from connito.experts.delta.staging import check_out_dir, staged_dir
from connito.models.fingerprint import checkpoint_fingerprint
from connito.models.loading import validate_checkpoint_dir

UPDATE_SCHEMA = "connito.fft_moe.update/1"
UPDATE_FILE = "update.json"
PACKAGE_DIR = "adapters"


@dataclass(frozen=True, kw_only=True)
class UpdateRecord(JsonRecord):
    """``update.json``: the client, its |D_n| and what its run recorded (``run``: ``top_k``, ``layers``,
    ``tokens_per_expert`` and, from the client's callback, the adapter spec), whose keys follow ``num_examples`` in
    the file in the order the run gave them."""

    SCHEMA: ClassVar[str] = UPDATE_SCHEMA
    INDENT: ClassVar[int | None] = 1
    WHAT: ClassVar[str] = "FFT-MoE update record"
    FIX: ClassVar[str] = "the client sends its update again (rerun its round job)"

    client: str
    num_examples: int
    run: Mapping[str, Any]

    def to_dict(self) -> dict:
        return {"schema": self.SCHEMA, "client": self.client, "num_examples": self.num_examples, **self.run}

    @classmethod
    def from_dict(cls, record: Mapping, path: str | Path | None = None) -> UpdateRecord:
        missing = [key for key in ("client", "num_examples") if key not in record]
        if missing:
            raise RecordError(f"{path or f'the {cls.WHAT}'} lacks {missing}: {cls.FIX}")
        run = {k: v for k, v in record.items() if k not in ("schema", "client", "num_examples")}
        return cls(client=record["client"], num_examples=record["num_examples"], run=run)

    @property
    def top_k(self) -> int | None:
        return self.run.get("top_k")

    @property
    def layers(self) -> list[int]:
        """The adapter layers, the rows of :attr:`tokens_per_expert`."""
        return list(self.run.get("layers", []))

    @property
    def tokens_per_expert(self) -> list[list[int]]:
        return list(self.run.get("tokens_per_expert", []))


class UpdateRefused(ValueError):
    """The server refuses one client's update; ``client`` names it, the message says why and what to do."""

    def __init__(self, client: str, reason: str):
        super().__init__(f"update of client '{client}' refused: {reason}")
        self.client, self.reason = client, reason


@dataclass
class ClientUpdate:
    """An accepted update: the client's adapter tensors (model names), |D_n| and the experts it trained."""

    client: str
    num_examples: int
    tensors: dict[str, torch.Tensor]
    trained: dict[tuple[int, int], bool]
    """(layer, expert) -> whether the client routed any token to that adapter expert this round."""


def expert_of(name: str) -> tuple[int, int] | None:
    """``model.layers.<l>.mlp_adapter.experts.<m>.<...>`` -> (l, m); None for a router tensor."""
    parts = name.split(".")
    if "mlp_adapter" not in parts:
        raise ValueError(f"{name} is not an adapter tensor")
    at = parts.index("mlp_adapter")
    if parts[at + 1] != "experts":
        return None
    return int(parts[at - 1]), int(parts[at + 2])


def write_update(
    tensors: Mapping[str, torch.Tensor],
    base_path: str | Path,
    out_dir: str | Path,
    *,
    client: str,
    num_examples: int,
    record: Mapping,
    overwrite: bool = False,
) -> Path:
    """Write a client's update: ``tensors`` (adapter tensors by model name) as a delta package of ``base_path`` and
    ``record`` (``top_k``, ``layers``, ``tokens_per_expert`` of the client's run: ``hf/fft_moe_adapters.json``)."""
    if num_examples < 1:
        raise ValueError(f"client '{client}': num_examples={num_examples} must be >= 1 (|D_n|, its training rows)")
    base_path = Path(base_path).expanduser().resolve()
    out = check_out_dir(out_dir, overwrite, {"the base checkpoint": base_path})
    base_config = validate_checkpoint_dir(base_path)
    files = {MODULES_FILE: {module_key(n): t.detach().to("cpu", copy=True).contiguous() for n, t in tensors.items()}}
    num_layers = int(base_config.get("num_hidden_layers", 0))
    manifest = DeltaManifest(
        base_fingerprint=checkpoint_fingerprint(base_path),
        model_type=base_config["model_type"],
        base_config=comparable_config(base_config),
        # no routed expert of the base (the adapters are modules): an all-false placeholder mask [layers, 1] that
        # names no MoE layer, the same for a dense and an MoE base
        experts=ExpertMask.empty(num_layers, 1, ()),
        modules=sorted(tensors),
        tensors={
            k: TensorEntry(MODULES_FILE, tuple(t.shape), dtype_name(t.dtype)) for k, t in files[MODULES_FILE].items()
        },
        files={},
        dtype=dtype_name(next(iter(tensors.values())).dtype),
        connito_version=connito.__version__,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        base_path=str(base_path),
    )
    with staged_dir(out) as stage:
        package = stage / PACKAGE_DIR
        package.mkdir()
        save_file(files[MODULES_FILE], package / MODULES_FILE, metadata={"format": "pt"})
        manifest.files[MODULES_FILE] = {
            "sha256": file_sha256(package / MODULES_FILE),
            "bytes": (package / MODULES_FILE).stat().st_size,
        }
        atomic_write_text(package / MANIFEST_FILE, json.dumps(manifest.to_dict(), indent=2) + "\n")
        UpdateRecord(client=client, num_examples=int(num_examples), run=dict(record)).save(stage / UPDATE_FILE)
    return out


def update_bytes(update_dir: str | Path) -> int:
    """What the client uploads: the bytes of its package's files and manifest."""
    package = Path(update_dir) / PACKAGE_DIR
    return sum(p.stat().st_size for p in package.iterdir()) + (Path(update_dir) / UPDATE_FILE).stat().st_size


def accept_update(update_dir: str | Path, base_fingerprint: str, expected: Mapping[str, torch.Tensor]) -> ClientUpdate:
    """The update at ``update_dir`` if the server accepts it (see the module docstring); :class:`UpdateRefused`
    naming the client otherwise. ``expected``: the global adapters (names and shapes every update must match)."""
    update_dir = Path(update_dir)
    try:
        update = UpdateRecord.load(update_dir / UPDATE_FILE)
    except RecordError as err:  # missing, not JSON, another kind or version: named by its folder
        raise UpdateRefused(update_dir.name, str(err)) from None
    client = str(update.client)
    try:
        delta = load_delta(update_dir / PACKAGE_DIR)
    except DeltaError as err:
        raise UpdateRefused(client, f"its package fails verification ({err})") from None
    if delta.manifest.base_fingerprint != base_fingerprint:
        raise UpdateRefused(
            client,
            f"it was trained on another base (fingerprint {delta.manifest.base_fingerprint[:19]}..., the server's "
            f"{base_fingerprint[:19]}...); the client must train from the round's base checkpoint",
        )
    tensors = delta.modules
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise UpdateRefused(
            client, f"its adapters do not match the global ones: missing {missing[:3]}, unknown {extra[:3]}"
        )
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise UpdateRefused(client, f"{name} is {tuple(tensor.shape)}, the global {tuple(expected[name].shape)}")
        if not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise UpdateRefused(client, f"{name} holds {bad} non-finite values (NaN or inf); its training diverged")
    num_examples = update.num_examples
    if not isinstance(num_examples, int) or num_examples < 1:
        raise UpdateRefused(client, f"num_examples={num_examples!r} is not a positive count of training rows")
    layers, tokens = update.layers, update.tokens_per_expert
    trained = {(layer, m): count > 0 for layer, row in zip(layers, tokens, strict=True) for m, count in enumerate(row)}
    return ClientUpdate(client, num_examples, tensors, trained)


def aggregate(
    updates: Sequence[ClientUpdate], previous: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]], dict[str, list[str]]]:
    """(global experts and routers' previous values, each client's router, the clients averaged into each expert).

    Every expert tensor is the |D_n|-weighted mean over the clients that trained that expert (module docstring);
    router tensors keep ``previous``'s value in the global set and each client's own value in ``routers``."""
    merged = {name: tensor.clone() for name, tensor in previous.items()}
    contributors: dict[str, list[str]] = {}
    for name in previous:
        expert = expert_of(name)
        if expert is None:
            continue
        chosen = [u for u in updates if u.trained.get(expert, False)]
        contributors[f"{expert[0]}.{expert[1]}"] = [u.client for u in chosen]
        if not chosen:
            continue
        total = sum(u.num_examples for u in chosen)
        acc = torch.zeros_like(previous[name], dtype=torch.float64)
        for u in chosen:
            acc += (u.num_examples / total) * u.tensors[name].to(torch.float64)
        merged[name] = acc.to(previous[name].dtype)
    routers = {u.client: {n: t for n, t in u.tensors.items() if expert_of(n) is None} for u in updates}
    return merged, routers, contributors


def client_start(global_tensors: Mapping[str, torch.Tensor], router: Mapping[str, torch.Tensor] | None):
    """Client n's adapters for the next round: the global experts with its own router (the global one before it has
    trained one)."""
    return {**global_tensors, **(router or {})}


def aggregate_round(
    update_dirs: Mapping[str, str | Path],
    base_path: str | Path,
    previous: Mapping[str, torch.Tensor],
    *,
    skip_refused: bool = False,
) -> dict:
    """Accept every client's update (in the order given), then aggregate. Returns ``{"global", "routers",
    "contributors", "accepted", "refused": {client: reason}, "bytes": {client: uploaded bytes}, "updates": {client:
    its accepted tensors}}``.
    A refusal stops the round with :class:`UpdateRefused` unless ``skip_refused``."""
    fingerprint = checkpoint_fingerprint(base_path)
    accepted, refused, sizes = [], {}, {}
    for client, update_dir in update_dirs.items():
        try:
            update = accept_update(update_dir, fingerprint, previous)
            if update.client != client:
                raise UpdateRefused(client, f"its update names client '{update.client}'; each client sends its own")
        except UpdateRefused as err:
            if not skip_refused:
                raise
            refused[client] = err.reason
            continue
        accepted.append(update)
        sizes[client] = update_bytes(update_dir)
    if not accepted:
        raise UpdateRefused(", ".join(refused) or "none", "no update of this round was accepted; nothing to aggregate")
    merged, routers, contributors = aggregate(accepted, previous)
    return {
        "global": merged,
        "routers": routers,
        "contributors": contributors,
        "accepted": [u.client for u in accepted],
        "refused": refused,
        "bytes": sizes,
        "updates": {u.client: u.tensors for u in accepted},
    }
