"""Branch-Train-Stitch's stitching step (Zhang et al. 2025): a dense seed (the hub) and N dense domain branches of it,
all kept as they are, joined by stitch layers that alone will train.

:func:`stitch_branches` writes a ``save_pretrained`` directory of :mod:`connito.models.custom.modeling_connito_bts`
(the modeling file copied in, ``config.auto_map`` set): the hub is the seed bit for bit, branch i is branch i's
decoder bit for bit (its LM head is dropped: the output is the hub's), and a stitch after every ``stitch_every``
layers mixes the branches' hidden states into the hub's (softmax gates from the hub state) and feeds the hub's back
(sigmoid gates). Projections start at zero, so the stitched model computes the seed's logits exactly until the
stitches train; gates start ``normal(0, initializer_range)`` from a generator seeded by ``seed``. Training then
freezes everything but ``stitches.*`` (``connito btx mix.method=bts`` does it in its fine-tuning job).

Branches are opted out at load time without retraining the others, ``from_pretrained(path,
active_branches=[...])`` (the to-hub softmax renormalises over the branches left), or for good with
:func:`opt_out_branches`, which writes the checkpoint without them.

What does not apply to a BTS model: it has no routed experts, so the expert view, router observation, ``connito
analyze``, selection, ESFT, expert parallelism and expert surgery refuse it as a dense family (its gates are
reported by the BTX pipeline's report instead).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch
from transformers.initialization import no_init_weights

from connito.composition.dense_to_moe import DenseCheckpoint, check_branch, write_checkpoint
from connito.composition.provenance import BtsRecord
from connito.experts.delta.staging import check_out_dir
from connito.models.custom.modeling_connito_bts import ConnitoBtsConfig, ConnitoBtsForCausalLM
from connito.models.families import ModelError
from connito.models.fingerprint import checkpoint_fingerprint

log = logging.getLogger("connito.composition")

SCHEMA = BtsRecord.SCHEMA
PROVENANCE_FILE = BtsRecord.FILE
HUBS = ("llama", "qwen3", "qwen2")


class BTSError(ModelError):
    """A hub, branches or options :func:`stitch_branches` cannot stitch; the message names the fix."""


def stitch_branches(
    seed_path: str | Path,
    branch_paths: Sequence[str | Path],
    out_dir: str | Path,
    *,
    branch_names: Sequence[str] | None = None,
    stitch_every: int = 2,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Stitch the frozen ``seed_path`` (hub) and ``branch_paths`` into a BTS checkpoint at ``out_dir`` (returned)."""
    seed_dir = Path(seed_path).expanduser().resolve()
    branch_dirs = [Path(p).expanduser().resolve() for p in branch_paths]
    names = list(branch_names) if branch_names is not None else [f"branch{i}" for i in range(len(branch_dirs))]
    if len(branch_dirs) < 1:
        raise BTSError("BTS stitches at least 1 branch to the hub, got none")
    if len(names) != len(branch_dirs) or len(set(names)) != len(names):
        raise BTSError(f"branch_names={names}: one distinct name per branch ({len(branch_dirs)} branches)")
    for i, path in enumerate(branch_dirs):
        if path == seed_dir or path in branch_dirs[:i]:
            raise BTSError(f"branch {i} ('{path}') is the hub or another branch: pass each branch once")
    inputs = {"the hub": seed_dir, **{f"branch {i}": p for i, p in enumerate(branch_dirs)}}
    out = check_out_dir(out_dir, overwrite, inputs)
    hub = DenseCheckpoint(seed_dir, "the hub", BTSError)
    branches = [DenseCheckpoint(p, f"branch {i}", BTSError) for i, p in enumerate(branch_dirs)]
    base = dict(hub.config)
    if base.get("model_type") not in HUBS:
        raise BTSError(f"{hub} is a {base.get('model_type')} model; BTS stitches dense {', '.join(HUBS)} checkpoints")
    if base.get("use_sliding_window"):
        raise BTSError(f"{hub} uses sliding-window attention, which BTS does not stitch (untested)")
    for branch in branches:
        check_branch(hub, branch, BTSError)
    layers = int(base["num_hidden_layers"])
    if not isinstance(stitch_every, int) or not 1 <= stitch_every <= layers:
        raise BTSError(f"stitch_every={stitch_every!r}: a stitch after every k layers, 1 <= k <= {layers}")
    config = ConnitoBtsConfig(
        base_config={k: v for k, v in base.items() if k not in ("architectures", "auto_map", "transformers_version")},
        branch_names=names,
        stitch_every=stitch_every,
        bos_token_id=base.get("bos_token_id"),
        eos_token_id=base.get("eos_token_id"),
        pad_token_id=base.get("pad_token_id"),
    )
    dtype = hub.dtype()
    with no_init_weights():  # every tensor is written below
        model = ConnitoBtsForCausalLM(config).to(dtype).eval()
    state = {f"hub.{name}": hub.tensor(name) for name in hub.headers}
    for i, branch in enumerate(branches):
        prefix = "model."
        for name in branch.headers:
            if name.startswith(prefix):
                state[f"branches.{i}.{name[len(prefix) :]}"] = branch.tensor(name)
    generator = torch.Generator().manual_seed(seed)
    std = float(base.get("initializer_range", 0.02))
    hidden = int(base["hidden_size"])
    for j in range(len(model.stitches)):
        for gate in ("to_hub_gate", "to_branch_gate"):
            state[f"stitches.{j}.{gate}.weight"] = torch.empty(len(names), hidden).normal_(0, std, generator=generator)
        for i in range(len(names)):
            for projection in ("to_hub", "to_branch"):
                state[f"stitches.{j}.{projection}.{i}.weight"] = torch.zeros(hidden, hidden)
    ours = model.state_dict()
    if base.get("tie_word_embeddings") and "hub.lm_head.weight" not in state:
        state["hub.lm_head.weight"] = state["hub.model.embed_tokens.weight"]
    missing, unexpected = sorted(set(ours) - set(state)), sorted(set(state) - set(ours))
    if missing or unexpected:
        raise BTSError(f"internal error: BTS left {missing[:4]} unwritten and {unexpected[:4]} unplaced; please report")
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)
    model.tie_weights()
    fingerprints = [checkpoint_fingerprint(c.path) for c in [hub, *branches]]
    provenance = BtsRecord(
        method="branch-train-stitch (Zhang et al. 2025): frozen hub and branches, trained stitch layers",
        hub={"path": str(seed_dir), "fingerprint": fingerprints[0], "model_type": base["model_type"]},
        branches=[
            {"name": n, "path": str(b.path), "fingerprint": f} for n, b, f in zip(names, branches, fingerprints[1:])
        ],
        stitch_every=stitch_every,
        stitches_after_layers=[(j + 1) * stitch_every - 1 for j in range(len(model.stitches))],
        init=f"projections 0 (identity), gates normal(0, {std}), seed {seed}",
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    write_checkpoint(model, out, seed_dir, PROVENANCE_FILE, provenance)
    log.info("BTS checkpoint written to %s: hub + %d branches (%s), %d stitches", out, len(names), ", ".join(names),
             len(model.stitches))  # fmt: skip
    return out


def opt_out_branches(path: str | Path, names: Sequence[str], out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """The BTS checkpoint at ``path`` without the branches ``names`` (their decoders and stitch rows removed, the
    others untouched), written to ``out_dir``. To opt out without writing anything, load with
    ``from_pretrained(path, active_branches=[...])``."""
    from transformers import AutoModelForCausalLM

    source = Path(path).expanduser().resolve()
    config = json.loads((source / "config.json").read_text())
    if config.get("model_type") != ConnitoBtsConfig.model_type:
        raise BTSError(f"'{source}' is a {config.get('model_type')} checkpoint, not a BTS one (connito_bts)")
    all_names = list(config["branch_names"])
    unknown = [n for n in names if n not in all_names]
    if unknown or len(set(names)) >= len(all_names):
        raise BTSError(f"opt out {list(names)}: name branches of this model ({all_names}), and keep at least one")
    out = check_out_dir(out_dir, overwrite, {"the BTS checkpoint": source})
    model = AutoModelForCausalLM.from_pretrained(source, dtype="auto").eval()
    keep = [i for i, n in enumerate(all_names) if n not in names]
    new_config = ConnitoBtsConfig(
        **{**model.config.to_dict(), "branch_names": [all_names[i] for i in keep], "active_branches": None}
    )
    with no_init_weights():
        smaller = ConnitoBtsForCausalLM(new_config).to(model.dtype).eval()
    state = {}
    for name, tensor in model.state_dict().items():
        parts = name.split(".")
        if parts[0] == "branches":
            if int(parts[1]) in keep:
                state[".".join(["branches", str(keep.index(int(parts[1]))), *parts[2:]])] = tensor
        elif parts[0] == "stitches" and parts[2] in ("to_hub", "to_branch"):
            if int(parts[3]) in keep:
                state[".".join([*parts[:3], str(keep.index(int(parts[3]))), *parts[4:]])] = tensor
        elif parts[0] == "stitches":
            state[name] = tensor[keep]
        else:
            state[name] = tensor
    smaller.load_state_dict(state, strict=True)
    smaller.tie_weights()
    if (source / PROVENANCE_FILE).is_file():
        record = BtsRecord.load(source / PROVENANCE_FILE)
        record = replace(record, opted_out=[*(record.opted_out or []), *names])
    else:  # a checkpoint stitched elsewhere: the file says only what was opted out here
        record = {"opted_out": list(names)}
    write_checkpoint(smaller, out, source, PROVENANCE_FILE, record)
    return out
