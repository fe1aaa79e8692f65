"""BAM's upcycling step (Zhang et al. 2024, "BAM! Just Like That: Simple and Efficient Parameter Upcycling for
Mixture of Experts"): N dense branches of one seed -> one model whose FFNs *and* attention layers are experts.

What BTX (:mod:`connito.composition.btx_merge`) does to the FFNs, BAM does to attention as well:

* **FFN experts**: branch i's FFN is routed expert i of every layer, top-2 with a new router (BTX's merge, its
  checks included: same architecture, tokenizer and tensors in every branch);
* **attention experts**: branch i's attention (q/k/v/o projections, q/k norms, biases) is attention expert i,
  **soft-routed**: every token runs all N experts, mixed by ``softmax(W_r x)`` with a new per-layer router
  ``W_r`` [N, H] (BAM's best variant); ``kv_sharing=True`` (BAM's key/value-sharing variant) keeps each branch's
  q/o projections and q norm and shares one k/v projection (and k norm), the mean over the branches, computed and
  cached once;
* ``parallel_block=True``: BAM's parallel attention + FFN block (both read the layer's input); a sequentially
  trained seed computes something else in it (the FFN no longer sees the attention output): the fine-tuning stage
  has to recover that;
* embeddings, the layers' norms, the final norm and the LM head: the mean over the branches (BTX's rule), or with
  ``shared="seed"`` the seed's;
* routers (FFN and attention): random, ``normal(0, initializer_range)`` from generators seeded by ``seed`` and
  ``seed + 1`` (BAM's), or given tensors (e.g. per-domain mean hidden states, rows in branch order).

The checkpoint is a ``save_pretrained`` directory of :mod:`connito.models.custom.modeling_connito_bam` (the modeling
file copied in, ``config.auto_map`` set): plain transformers loads it with ``trust_remote_code=True``; Connito
loads it natively. With every branch equal to the seed and the sequential block it computes the seed's logits
(both mixtures' weights sum to 1). ``connito_bam.json`` records the inputs and options beside BTX's record.

Operations that do not apply to a BAM model, refused where they are asked for: expert parallelism (DeepSpeed AutoEP
knows the transformers families by model_type only; ``parallel.ep_size`` must stay 1), and surgery on attention
experts (removal, pruning and merging act on the FFN experts the expert view sees).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

import torch
from transformers.initialization import no_init_weights

from connito.composition.btx_merge import BTXError, branch_mean, build_btx
from connito.composition.dense_to_moe import given_router_rows, write_checkpoint
from connito.composition.provenance import BamRecord
from connito.models.custom.modeling_connito_bam import BAM_CLASSES, BAM_KEYS

log = logging.getLogger("connito.composition")

SCHEMA = BamRecord.SCHEMA
PROVENANCE_FILE = BamRecord.FILE
SHARED_KV = ("k_proj", "v_proj", "k_norm")
"""What the experts share under key/value sharing."""


class BAMError(BTXError):
    """Branches or options :func:`merge_bam` cannot upcycle; the message names the fix."""


def _attention_tensors(checkpoint, layer: int) -> dict[str, torch.Tensor]:
    """A dense checkpoint's attention tensors of ``layer``, by their name under ``self_attn.``."""
    prefix = f"model.layers.{layer}.self_attn."
    return {name[len(prefix) :]: checkpoint.tensor(name) for name in checkpoint.headers if name.startswith(prefix)}


def merge_bam(
    seed_path: str | Path,
    branch_paths: Sequence[str | Path],
    out_dir: str | Path,
    *,
    kv_sharing: bool = False,
    parallel_block: bool = False,
    shared: str = "average",
    router_init: str | torch.Tensor = "random",
    attention_router_init: str | torch.Tensor = "random",
    seed: int = 0,
    family: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Upcycle dense ``branch_paths`` (trained from ``seed_path``) into a BAM checkpoint at ``out_dir`` (returned);
    see the module docstring. ``router_init`` / ``attention_router_init``: ``"random"`` or an [N, H] / [L, N, H]
    tensor (rows in branch order)."""
    merged = build_btx(
        seed_path, branch_paths, out_dir, family=family, shared=shared, router_init=router_init, seed=seed,
        overwrite=overwrite, method="BAM", error=BAMError,
    )  # fmt: skip
    btx, branches = merged.model, merged.branches
    base = btx.config.model_type
    config_cls, model_cls = BAM_CLASSES[base]
    settings = {k: v for k, v in btx.config.to_dict().items() if k not in ("model_type", "architectures", "auto_map")}
    config = config_cls(
        **settings, attention_experts=len(branches), kv_sharing=kv_sharing, parallel_block=parallel_block
    )
    dtype = merged.seed.dtype()
    with no_init_weights():  # every tensor is written below
        model = model_cls(config).to(dtype).eval()
    layers, hidden = config.num_hidden_layers, config.hidden_size
    shape_LNH = (layers, len(branches), hidden)
    if isinstance(attention_router_init, torch.Tensor):
        routers_LNH = given_router_rows(attention_router_init, shape_LNH, order="branches", error=BAMError)
    elif attention_router_init == "random":
        generator = torch.Generator().manual_seed(seed + 1)
        routers_LNH = torch.empty(shape_LNH).normal_(0.0, config.initializer_range, generator=generator)
    else:
        raise BAMError(f"attention_router_init={attention_router_init!r}: 'random' or an [N, H] / [L, N, H] tensor")

    state = {name: tensor for name, tensor in btx.state_dict().items() if ".self_attn." not in name}
    with torch.no_grad():
        for layer in range(layers):
            prefix = f"model.layers.{layer}.self_attn."
            per_branch = [_attention_tensors(b, layer) for b in branches]
            for i, tensors in enumerate(per_branch):
                for name, tensor in tensors.items():
                    if not (kv_sharing and name.split(".")[0] in SHARED_KV):
                        state[f"{prefix}experts.{i}.{name}"] = tensor
            if kv_sharing:
                for name in per_branch[0]:
                    if name.split(".")[0] in SHARED_KV:
                        state[prefix + name] = branch_mean((t[name] for t in per_branch), len(branches), dtype)
            state[f"{prefix}router.weight"] = routers_LNH[layer].to(dtype)
    ours = set(model.state_dict())
    missing, unexpected = sorted(ours - set(state)), sorted(set(state) - ours)
    if missing or unexpected:
        raise BAMError(f"internal error: BAM left {missing[:4]} unwritten and {unexpected[:4]} unplaced; please report")
    model.load_state_dict(state, strict=True)
    model.tie_weights()

    btx = {f.name: getattr(merged.provenance, f.name) for f in fields(merged.provenance)}
    provenance = BamRecord(
        **{**btx, "method": "BAM upcycling (Zhang et al. 2024): FFN and attention experts from the branches"},
        attention={
            "experts": [f"branch {i}" for i in range(len(branches))],
            "routing": "soft: softmax over all attention experts, every token runs every expert",
            **{key: getattr(config, key) for key in BAM_KEYS},
            "router_init": "given tensor"
            if isinstance(attention_router_init, torch.Tensor)
            else f"normal(0, {config.initializer_range}), seed {seed + 1}",
        },
    )
    write_checkpoint(model, merged.out, merged.seed.path, PROVENANCE_FILE, provenance)
    log.info(
        "BAM checkpoint written to %s: %d FFN and %d attention experts per layer%s%s", merged.out,
        len(branches), len(branches), ", shared keys/values" if kv_sharing else "",
        ", parallel blocks" if parallel_block else "",
    )  # fmt: skip
    return merged.out
