"""FlexOLMo (Shi et al. 2025): data owners train experts apart against a frozen public model; the experts merge
into one MoE with no joint training, and any owner's expert can be opted out at inference.

**The method.** A public dense model is trained on public data. Each data owner, alone and without sharing its
data, turns it into a two-expert MoE: expert 0 is the public FFN (the *anchor*), expert 1 a copy of it, every other
tensor the public one; the router scores both experts (top-2 of 2: every token uses both, weighted by the router's
softmax). The owner trains expert 1 and its own router row only; the public expert, the public router row and every
shared tensor (embeddings, attention, norms, lm_head) stay frozen. Since every owner trained against the very same
frozen public parts, their experts are compatible: the merged model holds the public FFN as expert 0 and owner i's
expert as expert i, with router rows ``[public row, owner rows...]``::

    owner_start("public", "owner-a", router_rows=rows_2H)                  # each owner, from the public checkpoint
    connito train model.path=owner-a '+callbacks.trainable.experts=[[0,1],[1,1],[2,1],[3,1]]' \\
        +callbacks.trainable.router_rows=true model.aux_loss_coef=0           # expert 1 + router row 1 only
    merge_owners("public", {"code": "a-trained", "math": "b-trained"}, "flexolmo")
    with OptOut(model, in_every_layer(*owner_experts("flexolmo", ["math"]))):  # opt an owner out
        ...

Opting out is :mod:`connito.routing.opt_out`: :class:`~connito.routing.opt_out.OptOut` (a router edit)
and :func:`~connito.routing.opt_out.save_without_experts` (the smaller checkpoint), which agree bit for bit;
:func:`owner_experts` maps owner names to the expert indices they take.

**Decisions.**

* Families: the public checkpoint is a dense ``llama`` (-> ``mixtral``) or ``qwen3`` (-> ``qwen3_moe``), through
  the BTX merge's family table and checks (:mod:`connito.composition.dense_to_moe`: same attention, norms and RoPE,
  tensor for tensor). ``qwen2`` is refused: ``qwen2_moe`` keeps an always-on shared expert beside the routed ones,
  which FlexOLMo has no place for. transformers' own ``flex_olmo`` family is OLMo2's (norms after attention and the
  FFN): a dense Llama or Qwen3 does not map onto it exactly.
* ``num_experts_per_tok`` is 2 in an owner's checkpoint and ``min(top_k, E)`` in the merged one (top-k weights
  renormalised, Mixtral always, Qwen3-MoE with ``norm_topk_prob=True``); ``router_aux_loss_coef`` is 0.01 as in
  BTX. With top-2 of 2 experts the load-balancing loss is a constant (every token uses both experts), so an owner
  trains with ``model.aux_loss_coef=0``.
* Router rows. FlexOLMo initialises each expert's router row with a domain embedding from an external embedder;
  Connito has none offline, and takes ``router_rows`` as given ([L, 2, H] per layer or [2, H] for every layer, rows
  (public, owner)), e.g. ``torch.stack([mean_ffn_inputs(public, public_batches), mean_ffn_inputs(public,
  owner_batches)], dim=1)`` (:mod:`connito.composition.hidden_means`: the mean hidden state the router sees). The
  paper measured this kind of initialisation slightly worse than its embedder's (43.5 vs 46.7 average). Without
  ``router_rows`` the rows are drawn from ``normal(0, initializer_range)``: the public row from a generator seeded
  by :data:`PUBLIC_ROUTER_SEED`, the same for every owner (the merge requires one public row), the owner's row from
  a generator seeded by ``seed``: give each owner its own.
* Owners are compared with the public checkpoint **bit for bit**, not within a tolerance: every shared tensor, the
  public expert 0 of every layer and router row 0 (the same in every owner, and, where the owner's
  ``connito_flexolmo.json`` records it, the row ``owner_start`` wrote: its sha256). Anything else means the owner
  did not train against the frozen public model, and its expert would not fit: the merge is refused, naming the
  owner, the first differing tensors with their max abs difference, and the fix. Also refused before anything is
  written: no owner, a name given twice, one directory under two names or equal to the public one, an owner whose
  provenance names another public checkpoint (by fingerprint) or another role, an owner config that differs from
  the one ``owner_start`` writes (but for :data:`~connito.composition.dense_to_moe.IGNORED_CONFIG_KEYS` and the
  training-time keys :data:`OWNER_TRAINING_KEYS`), a tokenizer file that differs from the public one (sha256), an
  owner of another dtype, tensors missing from or extra in an owner's checkpoint.
* Provenance: ``connito_flexolmo.json`` beside the weights (public path and fingerprint, the role
  ``owner_start`` or ``merged``, the router rows' origin; the merged one maps each owner name to its expert index).
  A trained export (``connito train``'s ``export/``) does not carry the owner's file: copy it over to have the
  fingerprint and public-row checks, otherwise the bit-for-bit tensor checks stand alone (logged).

**Not built.** FlexOLMo's optional learnable non-positive router bias (a per-expert bias, kept <= 0, that
calibrates how readily an owner's expert is chosen): no transformers family these checkpoints are written in
(Mixtral, Qwen3-MoE) has a router bias to export it into, so a trained bias could not leave Connito as a plain
``save_pretrained`` checkpoint. Nor the external embedder of the router-row initialisation (see above).

Shape legend: N owners, E experts per layer (2 in an owner's checkpoint, 1 + N merged), L decoder layers, H hidden
size, I dense FFN width.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from connito.composition.dense_to_moe import (
    FFN_PARAM,
    IGNORED_CONFIG_KEYS,
    DenseCheckpoint,
    build_moe,
    check_seed,
    given_router_rows,
    target_config,
    tokenizer_files,
    write_checkpoint,
)
from connito.composition.provenance import FlexOlmoRecord
from connito.experts.autoep_mapping import fuse_experts
from connito.experts.delta.manifest import file_sha256
from connito.experts.delta.staging import check_out_dir
from connito.experts.view import ExpertView
from connito.models.families import ModelError
from connito.models.fingerprint import checkpoint_fingerprint

log = logging.getLogger("connito.composition")

SCHEMA = FlexOlmoRecord.SCHEMA
PROVENANCE_FILE = FlexOlmoRecord.FILE
FAMILIES = {"llama": "mixtral", "qwen3": "qwen3_moe"}
PUBLIC_ROUTER_SEED = 20250
"""Seed of the generator the public router row is drawn from when no ``router_rows`` are given (one for all
owners)."""
OWNER_TRAINING_KEYS = frozenset({"router_aux_loss_coef", "output_router_logits", "router_jitter_noise"})
"""Config keys a training run sets (``connito train`` writes the load-balancing settings it ran with) that do not
change the model an owner hands over."""
OWNER_TOP_K = 2


class FlexOlmoError(ModelError):
    """A public checkpoint, owner checkpoint or option FlexOLMo cannot use; the message names the owner, tensor or
    option and the fix."""


def _rows_sha256(rows: torch.Tensor) -> str:
    """sha256 of a tensor's bytes (its dtype's, C order)."""
    return "sha256:" + hashlib.sha256(rows.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _public_ffns(public: DenseCheckpoint, layers: int) -> list[dict[str, torch.Tensor]]:
    """The public FFN of each layer as one expert in transformers form (``gate_up_proj``, ``down_proj``)."""
    ffns = [public.ffn(layer) for layer in range(layers)]
    return [fuse_experts(ffn["gate_proj"], ffn["up_proj"], ffn["down_proj"]) for ffn in ffns]


def _write_public(model: PreTrainedModel, public: DenseCheckpoint, ffns: list[dict], experts: Sequence[int]) -> None:
    """Write the public non-FFN tensors into ``model`` and the public FFN into ``experts`` of every layer; what is
    left to write is the other experts and the router rows (:class:`FlexOlmoError` names any other parameter: a
    bug)."""
    view = ExpertView(model)
    per_expert = {id(view.router_weight(layer)) for layer in view.moe_layers}
    per_expert |= {id(p) for _, block in view.blocks() for p in block.stacked_params().values()}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not FFN_PARAM.match(name):
                param.copy_(public.tensor(name))
            elif id(param) not in per_expert:
                raise FlexOlmoError(f"internal error: '{name}' would be left unwritten; please report it")
    for layer in view.moe_layers:
        for expert in experts:
            view.write_expert((layer, expert), ffns[layer])


def _public(public: str | Path) -> tuple[Path, DenseCheckpoint, str]:
    public_dir = Path(public).expanduser().resolve()
    checkpoint = DenseCheckpoint(public_dir, "the public checkpoint", FlexOlmoError)
    family = check_seed(checkpoint, None, method="FlexOlmo", error=FlexOlmoError, families=FAMILIES)
    return public_dir, checkpoint, family


def _public_record(public_dir: Path, config: dict) -> dict:
    return {
        "path": str(public_dir),
        "fingerprint": checkpoint_fingerprint(public_dir),
        "model_type": config["model_type"],
    }


def owner_start(
    public: str | Path,
    out: str | Path,
    *,
    router_rows: torch.Tensor | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write the two-expert MoE checkpoint a data owner trains (returned): expert 0 the public FFN, expert 1 an
    exact copy of it, every other tensor the public one, top-2 of 2; router rows (public, owner) from
    ``router_rows`` ([L, 2, H] or [2, H]) or drawn (see the module docstring). Then train expert 1 and router row 1
    only (``callbacks.trainable`` with ``experts=[[l, 1] for each layer]`` and ``router_rows=true``)."""
    public_dir, checkpoint, family = _public(public)
    out_dir = check_out_dir(out, overwrite, {"the public checkpoint": public_dir})
    dtype, config = checkpoint.dtype(), checkpoint.config
    layers, hidden = int(config["num_hidden_layers"]), int(config["hidden_size"])
    std = float(config.get("initializer_range", 0.02))
    if router_rows is None:
        public_LH = torch.empty(layers, hidden).normal_(
            0.0, std, generator=torch.Generator().manual_seed(PUBLIC_ROUTER_SEED)
        )
        owner_LH = torch.empty(layers, hidden).normal_(0.0, std, generator=torch.Generator().manual_seed(seed))
        rows_LEH = torch.stack([public_LH, owner_LH], dim=1)
        init = f"normal(0, {std}): public row seed {PUBLIC_ROUTER_SEED}, owner row seed {seed}"
    else:
        rows_LEH = given_router_rows(
            router_rows, (layers, 2, hidden), order="public, owner", error=FlexOlmoError, name="router_rows"
        )
        init = "given tensor"
    rows_LEH = rows_LEH.to(dtype)
    moe_config = target_config(config, family, 2, top_k=OWNER_TOP_K, error=FlexOlmoError)
    model = build_moe(moe_config, checkpoint, dtype, error=FlexOlmoError)
    _write_public(model, checkpoint, _public_ffns(checkpoint, layers), experts=[0, 1])
    view = ExpertView(model)
    for layer in view.moe_layers:
        view.write_router_rows(layer, [0, 1], rows_LEH[layer])
    provenance = FlexOlmoRecord(
        role="owner_start",
        method="FlexOlmo (Shi et al. 2025): a data owner's start",
        public=_public_record(public_dir, config),
        family=family,
        experts=["public FFN (frozen)", "owner (starts as a copy of the public FFN)"],
        router={"top_k": OWNER_TOP_K, "init": init, "public_rows_sha256": _rows_sha256(rows_LEH[:, 0])},
        train={"experts": [[layer, 1] for layer in range(layers)], "router_rows": True},
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    log.info("FlexOlmo owner start: %s -> %s (%s, 2 experts)", public_dir, out_dir, family)
    write_checkpoint(model, out_dir, public_dir, PROVENANCE_FILE, provenance)
    return out_dir


# -- the merge ---------------------------------------------------------------------------------------------------


def _owner_list(owners: Mapping[str, str | Path] | Iterable[tuple[str, str | Path]]) -> list[tuple[str, Path]]:
    pairs = list(owners.items()) if isinstance(owners, Mapping) else [tuple(pair) for pair in owners]
    out: list[tuple[str, Path]] = []
    for name, path in pairs:
        if not isinstance(name, str) or not name:
            raise FlexOlmoError(f"owner names are non-empty strings, got {name!r}")
        if name in dict(out):
            raise FlexOlmoError(f"owner '{name}' is given twice: name each owner once")
        resolved = Path(path).expanduser().resolve()
        if resolved in dict(out).values():
            other = next(n for n, p in out if p == resolved)
            raise FlexOlmoError(f"owners '{other}' and '{name}' are the same directory ('{resolved}'): pass each once")
        out.append((name, resolved))
    if not out:
        raise FlexOlmoError("merge_owners needs at least 1 owner checkpoint (name -> trained owner_start directory)")
    return out


def _check_owner_files(
    name: str, path: Path, public: DenseCheckpoint, public_fingerprint: str, expected: dict
) -> FlexOlmoRecord | None:
    """Provenance, config and tokenizer of one owner; returns its provenance (None when it has none)."""
    fix = "Every owner starts from owner_start of this very public checkpoint and trains expert 1 and router row 1"
    record: FlexOlmoRecord | None = None
    if (path / PROVENANCE_FILE).is_file():
        record = FlexOlmoRecord.load(path / PROVENANCE_FILE)
        if record.role != "owner_start":
            raise FlexOlmoError(
                f"owner '{name}' ('{path}'): {PROVENANCE_FILE} says role {record.role!r}, not 'owner_start'. {fix}"
            )
        theirs = record.public.get("fingerprint")
        if theirs != public_fingerprint:
            raise FlexOlmoError(
                f"owner '{name}' ('{path}') started from another public checkpoint ('{record.public.get('path')}', "
                f"fingerprint {str(theirs)[:19]}...), not '{public.path}' ({public_fingerprint[:19]}...). {fix}"
            )
    else:
        log.info("owner '%s' has no %s (a trained export): the tensor checks stand alone", name, PROVENANCE_FILE)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True).to_dict()
    except (OSError, ValueError) as err:
        raise FlexOlmoError(f"owner '{name}' ('{path}') is not a readable checkpoint: {err}") from None
    keys = sorted((set(config) | set(expected)) - IGNORED_CONFIG_KEYS - OWNER_TRAINING_KEYS)
    differ = [k for k in keys if config.get(k) != expected.get(k)]
    if differ:
        listed = "; ".join(f"'{k}': owner {config.get(k)!r}, owner_start {expected.get(k)!r}" for k in differ[:4])
        raise FlexOlmoError(f"owner '{name}' ('{path}') has another config than owner_start writes ({listed}). {fix}")
    ours = public.tokenizer_files()
    for file_name, file in sorted(tokenizer_files(path).items()):
        if file_name not in ours or file_sha256(ours[file_name]) != file_sha256(file):
            what = "the public checkpoint has none" if file_name not in ours else "differs from the public one (sha256)"
            raise FlexOlmoError(
                f"owner '{name}' ('{path}'): tokenizer file '{file_name}' {what}. Owners keep the public tokenizer"
            )
    return record


def _load_owner(name: str, path: Path, dtype: torch.dtype) -> PreTrainedModel:
    model, info = AutoModelForCausalLM.from_pretrained(
        path, local_files_only=True, dtype="auto", output_loading_info=True
    )
    problems = {k: sorted(v)[:3] for k, v in info.items() if k != "error_msgs" and v}
    if problems or info.get("error_msgs"):
        raise FlexOlmoError(
            f"owner '{name}' ('{path}') does not load as the owner_start model ({problems or info['error_msgs']}). "
            "Export the trained owner with save_pretrained"
        )
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    if dtypes != [str(dtype)]:
        raise FlexOlmoError(
            f"owner '{name}' ('{path}') holds {', '.join(dtypes)} tensors, the public checkpoint {dtype}: experts are "
            "copied bit for bit, never cast. Export the owner in the public checkpoint's dtype"
        )
    return model.eval()


def _differs(name: str, ours: torch.Tensor, theirs: torch.Tensor, out: list[str]) -> None:
    if not torch.equal(ours, theirs):
        out.append(f"{name} (max abs diff {(ours.double() - theirs.double()).abs().max().item():.3g})")


def _check_owner_tensors(
    owner: PreTrainedModel, public: DenseCheckpoint, ffns: list[dict], public_rows_LH: torch.Tensor, reference: str
) -> list[str]:
    """Every shared tensor, expert 0 and router row 0 of ``owner`` against the public ones; the differing ones."""
    differ: list[str] = []
    names = {id(p): n for n, p in owner.named_parameters()}
    for param_name, param in owner.named_parameters():
        if not FFN_PARAM.match(param_name):
            _differs(param_name, param.detach(), public.tensor(param_name), differ)
    view = ExpertView(owner)
    for layer, block in view.blocks():
        expert = view.read_expert((layer, 0))
        stacked = {names[id(p)]: key for key, p in block.stacked_params().items()}
        for param_name, key in stacked.items():
            _differs(f"{param_name}[0] (public expert)", expert[key], ffns[layer][key], differ)
        weight = view.router_weight(layer)
        where = f"{names[id(weight)]}[0] (public router row, vs {reference})"
        _differs(where, weight[0].detach(), public_rows_LH[layer], differ)
    return differ


def merge_owners(
    public: str | Path,
    owners: Mapping[str, str | Path] | Sequence[tuple[str, str | Path]],
    out: str | Path,
    *,
    top_k: int = 2,
    overwrite: bool = False,
) -> Path:
    """Merge trained owner checkpoints (``owners``: name -> directory, in expert order) of ``public`` into one MoE
    checkpoint at ``out`` (returned): expert 0 the public FFN, expert i owner i's expert 1 (bit for bit), router rows
    [public row, owner rows...], ``num_experts_per_tok = min(top_k, E)``, ``connito_flexolmo.json`` naming each
    owner's expert. Everything is checked (see the module docstring) before anything is written."""
    pairs = _owner_list(owners)
    if int(top_k) < 1:
        raise FlexOlmoError(f"top_k={top_k}: expected at least 1")
    public_dir, checkpoint, family = _public(public)
    for name, path in pairs:
        if path == public_dir:
            raise FlexOlmoError(f"owner '{name}' is the public checkpoint itself: pass the trained owner checkpoints")
    inputs = {"the public checkpoint": public_dir, **{f"owner '{n}'": p for n, p in pairs}}
    out_dir = check_out_dir(out, overwrite, inputs)
    dtype, config = checkpoint.dtype(), checkpoint.config
    layers = int(config["num_hidden_layers"])
    num_experts = 1 + len(pairs)
    chosen = min(int(top_k), num_experts)
    expected = target_config(config, family, 2, top_k=OWNER_TOP_K, error=FlexOlmoError).to_dict()
    moe_config = target_config(config, family, num_experts, top_k=chosen, error=FlexOlmoError)
    model = build_moe(moe_config, checkpoint, dtype, error=FlexOlmoError)
    ffns = _public_ffns(checkpoint, layers)
    _write_public(model, checkpoint, ffns, experts=[0])
    merged = ExpertView(model)
    owner_rows: list[torch.Tensor] = []
    public_rows_LH, reference = None, ""
    records = {}
    public_record = _public_record(public_dir, config)
    for name, path in pairs:
        record = _check_owner_files(name, path, checkpoint, public_record["fingerprint"], expected)
        owner = _load_owner(name, path, dtype)
        view = ExpertView(owner)
        rows_LEH = torch.stack([view.read_router(layer) for layer in range(layers)])
        recorded = None if record is None else record.router.get("public_rows_sha256")
        if recorded is not None and _rows_sha256(rows_LEH[:, 0]) != recorded:
            raise FlexOlmoError(
                f"owner '{name}' ('{path}'): router row 0 (the public row) is not the one owner_start wrote (sha256 "
                "differs): it was trained. Train with callbacks.trainable router_rows=true (not routers=true)"
            )
        if public_rows_LH is None:
            public_rows_LH, reference = rows_LEH[:, 0].clone(), f"owner '{name}'"
        differ = _check_owner_tensors(owner, checkpoint, ffns, public_rows_LH, reference)
        if differ:
            raise FlexOlmoError(
                f"owner '{name}' ('{path}') differs from the public model in {len(differ)} shared tensors, first: "
                f"{'; '.join(differ[:3])}. Owners train expert 1 and router row 1 only, everything else frozen "
                "(callbacks.trainable experts=[[l, 1] for each layer], router_rows=true) from owner_start of the same "
                "public checkpoint and public router rows"
            )
        index = len(records) + 1
        untrained = True
        for layer in range(layers):
            expert = view.read_expert((layer, 1))
            untrained &= all(torch.equal(expert[k], ffns[layer][k]) for k in expert)
            merged.write_expert((layer, index), expert)
        if untrained:
            log.warning("owner '%s': expert 1 still equals the public FFN in every layer (untrained?)", name)
        owner_rows.append(rows_LEH[:, 1])
        records[name] = {"expert": index, "path": str(path), "fingerprint": checkpoint_fingerprint(path)}
        del owner, view
    routers_LEH = torch.stack([public_rows_LH, *owner_rows], dim=1).to(dtype)
    for layer in merged.moe_layers:
        merged.write_router_rows(layer, list(range(num_experts)), routers_LEH[layer])
    provenance = FlexOlmoRecord(
        role="merged",
        method="FlexOlmo (Shi et al. 2025): owners' experts merged against the public model",
        public=public_record,
        family=family,
        public_expert=0,
        owners=records,
        experts=["public", *records],
        router={"top_k": chosen, "rows": "public row (as in every owner), then each owner's trained row"},
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    write_checkpoint(model, out_dir, public_dir, PROVENANCE_FILE, provenance)
    log.info("FlexOlmo checkpoint written to %s: public + %s, top-%d", out_dir, ", ".join(records), chosen)
    return out_dir


def owner_experts(merged_dir: str | Path, names: str | Iterable[str]) -> list[int]:
    """The expert indices (every MoE layer) of owners ``names`` in a :func:`merge_owners` checkpoint, e.g. to opt
    them out: ``OptOut(model, in_every_layer(*owner_experts(path, ["math"])))``."""
    path = Path(merged_dir).expanduser()
    file = path / PROVENANCE_FILE
    if not file.is_file():
        raise FlexOlmoError(f"'{path}' has no {PROVENANCE_FILE}: not a checkpoint merge_owners wrote")
    record = FlexOlmoRecord.load(file)
    if record.role != "merged" or record.owners is None:
        raise FlexOlmoError(f"'{path}' is a FlexOlmo {record.role!r} checkpoint, not a merged one: it has no owners")
    known = record.owners
    names = [names] if isinstance(names, str) else list(names)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise FlexOlmoError(f"'{path}' has no owner {', '.join(map(repr, unknown))}; its owners: {', '.join(known)}")
    return [int(known[n]["expert"]) for n in names]
