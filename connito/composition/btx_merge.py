"""Branch-Train-MiX's merge step (Sukhbaatar et al. 2024): N dense branches of one seed -> one MoE checkpoint.

BTX trains N copies of a dense seed apart, one per domain (the branches), then mixes them: in every decoder layer
branch i's feed-forward network (SwiGLU gate/up/down) becomes routed expert i, everything else (embeddings,
attention, norms, lm_head) is the mean over the branches, and a new router per layer picks the top 2 experts (to be
trained with a load-balancing loss of coefficient 0.01). :func:`merge_branches` writes that model as a
``save_pretrained`` checkpoint of a transformers MoE family, so plain transformers loads it::

    merge_branches("seed", ["branch-code", "branch-math", "branch-wiki"], "btx")  # Llamas -> Mixtral, 3 experts

**Families.** Each dense seed family goes to the MoE family with the very same attention, norms and RoPE, so
attention, embeddings and norms carry over tensor for tensor (checked by parameter name and shape too):

| seed  | family    | attention               | notes                                                        |
|-------|-----------|-------------------------|--------------------------------------------------------------|
| llama | mixtral   | no biases, no q/k norms | ``attention_bias`` and ``mlp_bias`` must be off               |
| qwen3 | qwen3_moe | q/k RMSNorm on head_dim |                                                              |
| qwen2 | qwen2_moe | q/k/v biases            | the seed's FFN is also the always-on shared expert           |

Other pairs are refused: llama attention has no q/k norms for qwen3_moe, qwen2's q/k/v biases have no place in
Mixtral. Seeds with sliding-window layers are refused (untested).

**Qwen2-MoE's shared expert** is the seed's FFN at its own width (``shared_expert_intermediate_size =
intermediate_size``); transformers scales it per token by ``sigmoid(shared_expert_gate(x))``, and that gate's
weight is written as zeros, so the shared expert starts at exactly half the seed's FFN output for every token (a
token-independent start the gate learns away from) beside the routed mixture, whose weights sum to 1.

**What each expert and tensor is.** Expert ``i < N`` of every layer is branch i's FFN, bit for bit; with
``generalist=True`` expert N (the last) is the seed's FFN (the paper's generalist). ``moe_intermediate_size`` (and
Mixtral's ``intermediate_size``) is the dense FFN width. Every other tensor is, with ``shared="average"`` (the
paper's), the mean over the branches computed as :func:`branch_mean` does (float32 sum in branch order, divided by
N, cast to the checkpoint's dtype), or with ``shared="seed"`` the seed's own. Routers: ``num_experts_per_tok=2``,
``norm_topk_prob=True`` (BTX's softmax over the top-k logits; Mixtral always renormalises),
``router_aux_loss_coef=0.01``; weights drawn layer by layer from ``normal(0, initializer_range)`` with a
``torch.Generator`` seeded by ``seed``, or given: an [E, H] tensor for every layer or [L, E, H] per layer (e.g.
per-domain mean hidden states, rows in expert order), cast to the checkpoint's dtype.

**Chunks** (``chunks=C``: N x C experts, each FFN split into several): every FFN is cut along its
intermediate width into C experts of width I / C; expert ``s * C + c`` is chunk c of source s (branch s, or the
generalist): gate and up rows ``[c * I/C, (c+1) * I/C)`` and those columns of down_proj times C; top-k becomes
``2 * C``. A SwiGLU FFN is the sum of its chunks, so where the router gives a source's chunks equal logits (equal
router rows, as per-domain mean rows repeated per chunk are), renormalised top-2C routing picks whole sources and
gives each chunk 1/C of its source's weight, which the factor C makes up for: the model then computes what whole
experts compute, up to float summation order. With C a power of two the scaling is exact.

**Refused before anything is written**: fewer than 2 branches, a branch given twice or equal to the seed, an output
directory equal to, inside or holding an input (or existing, without ``overwrite``), a branch of another
``model_type`` or whose ``config.json`` differs from the seed's in any key (but those in
:data:`IGNORED_CONFIG_KEYS`: the writer's bookkeeping, token ids and training-time settings, taken from the seed;
the key and both values are named), another set of tensors, another shape or dtype of one, a tokenizer file that
differs from the seed's by sha256 or that the seed lacks (files a branch lacks are not compared), an FFN that is
not bias-free SwiGLU, ``generalist=True`` into qwen2_moe (the seed's FFN is already its shared expert), a router
tensor of another shape. Branches with identical weights are merged with a warning. The checkpoint is written to a
temporary directory and renamed into place, with the seed's tokenizer files and generation config, and
``connito_btx.json`` (seed and branch paths and fingerprints, the options, what each expert is). Reading the seed,
the family checks, the MoE config and the staged writing are :mod:`connito.composition.dense_to_moe`, shared with
FlexOLMo's owner checkpoints (:mod:`connito.composition.flexolmo`).

Shape legend: N branches, C chunks per FFN, E experts per layer ((N, or N + 1 with the generalist) x C), L decoder
layers, H hidden size, I dense FFN width.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from transformers import PreTrainedModel

from connito.composition.dense_to_moe import (
    FAMILY_OF_SEED,
    FFN_PARAM,
    ROUTER_AUX_LOSS_COEF,
    DenseCheckpoint,
    build_moe,
    check_branch,
    check_seed,
    given_router_rows,
    target_config,
    write_checkpoint,
)
from connito.composition.provenance import BtxRecord
from connito.experts.autoep_mapping import fuse_experts
from connito.experts.delta.staging import check_out_dir
from connito.experts.view import ExpertView
from connito.models.families import ModelError
from connito.models.fingerprint import checkpoint_fingerprint

log = logging.getLogger("connito.composition")

SCHEMA = BtxRecord.SCHEMA
PROVENANCE_FILE = BtxRecord.FILE
TOP_K = 2


class BTXError(ModelError):
    """Branches (or options) :func:`merge_branches` cannot merge; the message names what differs and the fix."""


@dataclass(frozen=True)
class BTXOptions:
    """The merge's options as recorded in ``connito_btx.json``; checked on construction."""

    family: str
    """Target transformers MoE family: mixtral, qwen3_moe or qwen2_moe."""
    generalist: bool = False
    """Add the seed's FFN as one more expert (the last)."""
    shared: str = "average"
    """Non-FFN tensors: ``average`` (mean over the branches, the paper's) or ``seed`` (the seed's)."""
    router_init: str = "random"
    """``random`` (normal, std = the seed's initializer_range, seeded) or ``given`` (a tensor was passed)."""
    seed: int = 0
    """Seed of the random router weights' generator."""
    chunks: int = 1
    """Experts per FFN: each FFN cut into this many along its intermediate width; top-k is 2 x chunks."""

    def __post_init__(self):
        if not isinstance(self.chunks, int) or self.chunks < 1:
            raise BTXError(f"chunks={self.chunks!r}: expected a positive integer (1 keeps whole FFNs)")
        if self.family not in FAMILY_OF_SEED.values():
            raise BTXError(f"family='{self.family}' is not one BTX writes: {', '.join(FAMILY_OF_SEED.values())}")
        if self.shared not in ("average", "seed"):
            raise BTXError(f"shared='{self.shared}': expected 'average' (the paper's) or 'seed'")
        if self.router_init not in ("random", "given"):
            raise BTXError(f"router_init='{self.router_init}': expected 'random' or an [E, H] / [L, E, H] tensor")
        if self.generalist and self.family == "qwen2_moe":
            raise BTXError(
                "generalist=True with family='qwen2_moe' would hold the seed's FFN twice: qwen2_moe already keeps it "
                "as the always-on shared expert. Drop generalist"
            )


def branch_mean(tensors: Iterable[torch.Tensor], count: int, dtype: torch.dtype) -> torch.Tensor:
    """The mean of ``count`` tensors as the merge computes it: float32 sum in the given order, divided by count,
    cast to ``dtype``. Takes an iterable so a caller can stream tensors from disk one at a time."""
    total = None
    for tensor in tensors:
        tensor = tensor.to(torch.float32)
        total = tensor.clone() if total is None else total.add_(tensor)
    assert total is not None
    return (total / count).to(dtype)


def _router_rows(router_init: str | torch.Tensor, seed: int, shape_LEH: tuple[int, int, int], std: float):
    """[L, E, H] router weights: drawn from normal(0, std) with a generator seeded by ``seed``, or the given
    [E, H] (every layer) / [L, E, H] tensor."""
    if not isinstance(router_init, torch.Tensor):
        generator = torch.Generator().manual_seed(seed)
        return torch.empty(shape_LEH).normal_(0.0, std, generator=generator)
    order = "branches, then the generalist; a source's chunks one after another"
    return given_router_rows(router_init, shape_LEH, order=order, error=BTXError)


def _fill(
    model: PreTrainedModel, seed: DenseCheckpoint, branches: list[DenseCheckpoint], options: BTXOptions, routers_LEH
):
    """Write every parameter of ``model``; :class:`BTXError` names any left unwritten (a bug)."""
    params = dict(model.named_parameters())
    view = ExpertView(model)
    sources = branches + ([seed] if options.generalist else [])
    written: set[int] = set()
    with torch.no_grad():
        for name, param in params.items():
            if FFN_PARAM.match(name):
                continue
            if options.shared == "seed":
                param.copy_(seed.tensor(name))
            else:
                param.copy_(branch_mean((b.tensor(name) for b in branches), len(branches), param.dtype))
            written.add(id(param))
        chunks = options.chunks
        for layer in view.moe_layers:
            for index, source in enumerate(sources):
                for chunk, weights in enumerate(ffn_chunks(source.ffn(layer), chunks)):
                    view.write_expert((layer, index * chunks + chunk), weights)
            router = view.router_weight(layer)
            view.write_router_rows(layer, list(range(len(sources) * chunks)), routers_LEH[layer].to(router.dtype))
            written |= {id(p) for p in view.block(layer).stacked_params().values()} | {id(router)}
            shared_expert, gate = view.shared_experts(layer), view.shared_expert_gate(layer)
            if shared_expert is not None:
                shared_expert.load_state_dict({f"{p}.weight": t for p, t in seed.ffn(layer).items()}, strict=True)
                for param in gate.parameters():
                    param.zero_()
                written |= {id(p) for p in [*shared_expert.parameters(), *gate.parameters()]}
    missing = [name for name, param in params.items() if id(param) not in written]
    if missing:
        raise BTXError(f"internal error: the merge left {missing[:4]} unwritten; please report it")


def ffn_chunks(ffn: dict[str, torch.Tensor], chunks: int) -> list[dict[str, torch.Tensor]]:
    """A SwiGLU FFN (gate_proj/up_proj [I, H], down_proj [H, I]) as ``chunks`` fused experts of width I / chunks,
    down_proj columns times ``chunks`` (see the module docstring); ``chunks=1``: the FFN itself, bit for bit."""
    if chunks == 1:
        return [fuse_experts(ffn["gate_proj"], ffn["up_proj"], ffn["down_proj"])]
    width = ffn["gate_proj"].shape[0] // chunks
    parts = []
    for chunk in range(chunks):
        rows = slice(chunk * width, (chunk + 1) * width)
        down = ffn["down_proj"][:, rows] * chunks
        parts.append(fuse_experts(ffn["gate_proj"][rows], ffn["up_proj"][rows], down))
    return parts


@dataclass
class MergedBranches:
    """What :func:`build_btx` made in memory, before it is written: the filled MoE model, its inputs and the
    provenance record (BAM extends all of them)."""

    model: PreTrainedModel
    seed: DenseCheckpoint
    branches: list[DenseCheckpoint]
    out: Path
    provenance: BtxRecord


def build_btx(
    seed_path: str | Path,
    branch_paths: Sequence[str | Path],
    out_dir: str | Path,
    *,
    family: str | None = None,
    generalist: bool = False,
    shared: str = "average",
    router_init: str | torch.Tensor = "random",
    seed: int = 0,
    chunks: int = 1,
    overwrite: bool = False,
    method: str = "BTX",
    error: type[ModelError] = BTXError,
) -> MergedBranches:
    """Every check of :func:`merge_branches` (``out_dir`` included) and the merged model in memory, unwritten;
    ``method`` and ``error`` name the caller in what is refused."""
    seed_dir = Path(seed_path).expanduser().resolve()
    branch_dirs = [Path(p).expanduser().resolve() for p in branch_paths]
    if len(branch_dirs) < 2:
        raise error(f"{method} merges at least 2 branches, got {len(branch_dirs)}: {[str(p) for p in branch_dirs]}")
    for i, path in enumerate(branch_dirs):
        if path == seed_dir:
            raise error(f"branch {i} ('{path}') is the seed itself: pass the branches trained from it")
        if path in branch_dirs[:i]:
            raise error(f"branch {i} ('{path}') is also branch {branch_dirs.index(path)}: pass each branch once")
    inputs = {"the seed checkpoint": seed_dir, **{f"branch {i}": p for i, p in enumerate(branch_dirs)}}
    out = check_out_dir(out_dir, overwrite, inputs)
    base = DenseCheckpoint(seed_dir, "the seed", error)
    branches = [DenseCheckpoint(p, f"branch {i}", error) for i, p in enumerate(branch_dirs)]
    given = isinstance(router_init, torch.Tensor)
    family = check_seed(base, family, method=method, error=error)
    options = BTXOptions(family, generalist, shared, "given" if given else router_init, seed, chunks)
    for branch in branches:
        check_branch(base, branch, error)
    dtype, config = base.dtype(), base.config
    width = int(config["intermediate_size"])
    if width % chunks:
        raise error(
            f"chunks={chunks} does not divide the FFN width intermediate_size={width}: choose a divisor of {width}"
        )
    num_experts = (len(branches) + int(generalist)) * chunks
    shape_LEH = (int(config["num_hidden_layers"]), num_experts, int(config["hidden_size"]))
    std = float(config.get("initializer_range", 0.02))
    routers_LEH = _router_rows(router_init, seed, shape_LEH, std)
    top_k = TOP_K * chunks
    moe_config = target_config(
        config, options.family, num_experts, top_k=top_k, error=error, expert_width=width // chunks
    )
    model = build_moe(moe_config, base, dtype, error=error)
    fingerprints = [checkpoint_fingerprint(c.path) for c in [base, *branches]]
    if len(set(fingerprints[1:])) < len(branches):
        log.warning("two or more branches hold the same weights: their experts will be identical")
    log.info("merging %d branches of %s into %s, %d experts per layer", len(branches), seed_dir, out, num_experts)
    _fill(model, base, branches, options, routers_LEH)
    experts = [f"branch {i}" for i in range(len(branches))] + (["seed (generalist)"] if generalist else [])
    if chunks > 1:
        experts = [f"{source}, chunk {c} of {chunks}" for source in experts for c in range(chunks)]
    provenance = BtxRecord(
        method="branch-train-mix merge (Sukhbaatar et al. 2024)",
        seed={"path": str(seed_dir), "fingerprint": fingerprints[0], "model_type": config["model_type"]},
        branches=[{"path": str(b.path), "fingerprint": f} for b, f in zip(branches, fingerprints[1:])],
        options=asdict(options),
        experts=experts,
        shared_expert="seed FFN, gate weight 0 (scale 0.5)" if options.family == "qwen2_moe" else None,
        router={
            "top_k": top_k,
            "norm_topk_prob": True,
            "aux_loss_coef": ROUTER_AUX_LOSS_COEF,
            "init": "given tensor" if given else f"normal(0, {std}), seed {seed}",
        },
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    return MergedBranches(model, base, branches, out, provenance)


def merge_branches(seed_path: str | Path, branch_paths: Sequence[str | Path], out_dir: str | Path, **options) -> Path:
    """Merge dense ``branch_paths`` (trained from ``seed_path``) into an MoE checkpoint at ``out_dir`` (returned).
    ``options`` are :func:`build_btx`'s keywords: ``family`` (default the seed's: llama -> mixtral, qwen3 ->
    qwen3_moe, qwen2 -> qwen2_moe), ``generalist``, ``shared``, ``router_init``, ``seed``, ``chunks``,
    ``overwrite``; see the module docstring for what each expert and tensor becomes and what is refused."""
    merged = build_btx(seed_path, branch_paths, out_dir, **options)
    write_checkpoint(merged.model, merged.out, merged.seed.path, PROVENANCE_FILE, merged.provenance)
    log.info("BTX checkpoint written to %s (%s)", merged.out, ", ".join(merged.provenance.experts))
    return merged.out
