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

**Refused before anything is written**: fewer than 2 branches, a branch given twice or equal to the seed, an output
directory equal to, inside or holding an input (or existing, without ``overwrite``), a branch of another
``model_type`` or whose ``config.json`` differs from the seed's in any key (but those in
:data:`IGNORED_CONFIG_KEYS`: the writer's bookkeeping, token ids and training-time settings, taken from the seed;
the key and both values are named), another set of tensors, another shape or dtype of one, a tokenizer file that
differs from the seed's by sha256 or that the seed lacks (files a branch lacks are not compared), an FFN that is
not bias-free SwiGLU, ``generalist=True`` into qwen2_moe (the seed's FFN is already its shared expert), a router
tensor of another shape. Branches with identical weights are merged with a warning. The checkpoint is written to a
temporary directory and renamed into place, with the seed's tokenizer files and generation config, and
``connito_btx.json`` (seed and branch paths and fingerprints, the options, what each expert is).

Shape legend: N branches, E experts per layer (N, or N + 1 with the generalist), L decoder layers, H hidden size,
I dense FFN width.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.initialization import no_init_weights

from connito.experts.autoep_mapping import fuse_experts
from connito.experts.delta.manifest import file_sha256
from connito.experts.delta.staging import TOKENIZER_FILES, check_out_dir, staged_dir
from connito.experts.view import ExpertView
from connito.models.families import ModelError
from connito.models.fingerprint import checkpoint_fingerprint
from connito.models.loading import validate_checkpoint_dir

log = logging.getLogger("connito.composition")

SCHEMA = "connito.btx/1"
PROVENANCE_FILE = "connito_btx.json"
FAMILY_OF_SEED = {"llama": "mixtral", "qwen3": "qwen3_moe", "qwen2": "qwen2_moe"}
ATTENTION = {"llama": "no biases, no q/k norms", "qwen3": "q/k RMSNorms on the head dim", "qwen2": "q/k/v biases"}
SEED_OFF_KEYS = {"llama": ("attention_bias", "mlp_bias"), "qwen3": (), "qwen2": ()}
"""Seed config keys the target family has no place for: they must be false (off)."""
TOP_K = 2
ROUTER_AUX_LOSS_COEF = 0.01
IGNORED_CONFIG_KEYS = frozenset(
    {
        "_name_or_path",
        "architectures",
        "transformers_version",
        "dtype",
        "torch_dtype",
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "id2label",
        "label2id",
        "problem_type",
        "chunk_size_feed_forward",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "initializer_range",
        "attention_dropout",
    }
)
"""Config keys branches may differ in from the seed: bookkeeping, token ids (the tokenizer files are compared
instead) and training-only settings; the merged model takes the seed's."""
NOT_CARRIED = frozenset(
    {"model_type", "architectures", "transformers_version", "_name_or_path", "dtype", "torch_dtype"}
)
MUST_CARRY = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size")
MUST_CARRY += ("tie_word_embeddings", "rms_norm_eps", "hidden_act", "max_position_embeddings", "rope_parameters")
FFN_PARAM = re.compile(r"^model\.layers\.(\d+)\.mlp\.(.+)$")
FFN_PROJS = ("gate_proj", "up_proj", "down_proj")
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


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

    def __post_init__(self):
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


class DenseCheckpoint:
    """A dense ``save_pretrained`` checkpoint read tensor by tensor (one or several safetensors files)."""

    def __init__(self, path: Path, what: str):
        self.path, self.what = path, what
        self.config = validate_checkpoint_dir(path)
        index = path / "model.safetensors.index.json"
        if index.is_file():
            files = sorted({path / name for name in json.loads(index.read_text())["weight_map"].values()})
        else:
            files = [path / "model.safetensors"]
        self._handles, self.files, self.headers = {}, {}, {}
        for file in files:
            handle = self._open(file)
            for name in handle.keys():
                piece = handle.get_slice(name)
                self.files[name] = file
                self.headers[name] = (piece.get_dtype(), tuple(piece.get_shape()))

    def __str__(self) -> str:
        return f"{self.what} ('{self.path}')"

    def _open(self, file: Path):
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(file), framework="pt")
            except (SafetensorError, OSError) as err:
                raise BTXError(f"{self}: cannot read {file.name} ({err}). Re-save it with save_pretrained") from None
        return self._handles[file]

    def tensor(self, name: str) -> torch.Tensor:
        return self._open(self.files[name]).get_tensor(name)

    def ffn(self, layer: int) -> dict[str, torch.Tensor]:
        return {proj: self.tensor(f"model.layers.{layer}.mlp.{proj}.weight") for proj in FFN_PROJS}

    def dtype(self) -> torch.dtype:
        dtypes = sorted({dtype for dtype, _ in self.headers.values()})
        if len(dtypes) != 1 or dtypes[0] not in SAFETENSORS_DTYPES:
            raise BTXError(f"{self} holds tensors of dtypes {dtypes}; BTX merges checkpoints of one float dtype")
        return SAFETENSORS_DTYPES[dtypes[0]]

    def tokenizer_files(self) -> dict[str, Path]:
        return {f.name: f for pattern in TOKENIZER_FILES for f in sorted(self.path.glob(pattern)) if f.is_file()}


def _check_inputs(seed: DenseCheckpoint, branch: DenseCheckpoint) -> None:
    """``branch`` has the seed's model_type, config (up to :data:`IGNORED_CONFIG_KEYS`), tensors and tokenizer."""
    fix = "BTX branches are trained from the seed and keep its architecture and tokenizer"
    if branch.config["model_type"] != seed.config["model_type"]:
        raise BTXError(
            f"{branch} is a {branch.config['model_type']} model, the seed a {seed.config['model_type']}. {fix}"
        )
    keys = sorted((set(seed.config) | set(branch.config)) - IGNORED_CONFIG_KEYS)
    differ = [k for k in keys if seed.config.get(k) != branch.config.get(k)]
    if differ:
        listed = "; ".join(f"'{k}': seed {seed.config.get(k)!r}, branch {branch.config.get(k)!r}" for k in differ[:4])
        raise BTXError(f"{branch} has another config than the seed ({listed}). {fix}")
    names = set(seed.headers) ^ set(branch.headers)
    if names:
        where = "has no" if min(names) in seed.headers else "has an extra"
        raise BTXError(f"{branch} {where} tensor '{min(names)}' (the seed's checkpoint differs). {fix}")
    for name, (dtype, shape) in seed.headers.items():
        (their_dtype, their_shape) = branch.headers[name]
        if their_shape != shape:
            raise BTXError(f"{branch}: '{name}' has shape {list(their_shape)}, in the seed {list(shape)}. {fix}")
        if their_dtype != dtype:
            raise BTXError(
                f"{branch}: '{name}' is {their_dtype}, in the seed {dtype}. Re-save the branch in the seed's dtype "
                "(experts are copied bit for bit, never cast)"
            )
    ours, theirs = seed.tokenizer_files(), branch.tokenizer_files()
    for name in sorted(theirs):
        if name not in ours:
            raise BTXError(f"{branch} has tokenizer file '{name}', the seed has none: another tokenizer. {fix}")
        if file_sha256(ours[name]) != file_sha256(theirs[name]):
            raise BTXError(f"{branch}: tokenizer file '{name}' differs from the seed's (sha256). {fix}")


def _check_seed(seed: DenseCheckpoint, family: str | None) -> str:
    """The target family for this seed, or :class:`BTXError` when it cannot hold the seed exactly."""
    config, seed_type = seed.config, seed.config["model_type"]
    natural = FAMILY_OF_SEED.get(seed_type)
    if natural is None:
        raise BTXError(
            f"{seed} is a {seed_type} model; BTX merges dense {', '.join(FAMILY_OF_SEED)} checkpoints "
            f"(into {', '.join(f'{k}->{v}' for k, v in FAMILY_OF_SEED.items())})"
        )
    family = family or natural
    if family not in FAMILY_OF_SEED.values():
        raise BTXError(f"family='{family}' is not one BTX writes: {', '.join(FAMILY_OF_SEED.values())}")
    if family != natural:
        other = next(k for k, v in FAMILY_OF_SEED.items() if v == family)
        raise BTXError(
            f"family='{family}' cannot hold a {seed_type} seed's attention exactly ({seed_type}: "
            f"{ATTENTION[seed_type]}; {family}: {ATTENTION[other]}). Merge {seed_type} branches into "
            f"family='{natural}'"
        )
    for key in SEED_OFF_KEYS[seed_type]:
        if config.get(key):
            raise BTXError(f"{seed} has {key}={config[key]!r}; {family} has no place for it (it must be false)")
    if config.get("use_sliding_window") or any(t != "full_attention" for t in config.get("layer_types") or []):
        raise BTXError(f"{seed} has sliding-window attention layers; BTX merges full-attention seeds only")
    layers = int(config["num_hidden_layers"])
    expected = [f"model.layers.{layer}.mlp.{proj}.weight" for layer in range(layers) for proj in FFN_PROJS]
    missing = [name for name in expected if name not in seed.headers]
    if missing:
        raise BTXError(f"{seed} has no FFN tensor '{missing[0]}': not a dense {seed_type} checkpoint")
    for name in seed.headers:
        match = FFN_PARAM.match(name)
        if match and (int(match[1]) >= layers or match[2] not in {f"{p}.weight" for p in FFN_PROJS}):
            raise BTXError(
                f"{seed}: FFN tensor '{name}' has no place in a {family} expert (bias-free SwiGLU gate/up/down_proj)"
            )
    return family


def _router_rows(router_init: str | torch.Tensor, seed: int, shape_LEH: tuple[int, int, int], std: float):
    """[L, E, H] router weights: drawn from normal(0, std) with a generator seeded by ``seed``, or the given
    [E, H] (every layer) / [L, E, H] tensor."""
    layers, experts, hidden = shape_LEH
    if not isinstance(router_init, torch.Tensor):
        generator = torch.Generator().manual_seed(seed)
        return torch.empty(shape_LEH).normal_(0.0, std, generator=generator)
    rows = router_init.detach().cpu()
    if tuple(rows.shape) not in ((experts, hidden), shape_LEH) or not rows.is_floating_point():
        raise BTXError(
            f"router_init is a {rows.dtype} tensor of shape {list(rows.shape)}; expected float [E, H] = "
            f"[{experts}, {hidden}] (every layer) or [L, E, H] = {list(shape_LEH)}, rows in expert order "
            "(branches, then the generalist)"
        )
    if not torch.isfinite(rows).all():
        raise BTXError("router_init holds non-finite values")
    return rows.expand(shape_LEH) if rows.dim() == 2 else rows


def target_config(seed_config: dict, family: str, num_experts: int) -> PretrainedConfig:
    """The MoE config: the seed's attention, norm, RoPE and vocabulary keys, E experts of the dense FFN width."""
    defaults = AutoConfig.for_model(family).to_dict()
    carried = {k: v for k, v in seed_config.items() if k in defaults and k not in NOT_CARRIED}
    carried["head_dim"] = (
        seed_config.get("head_dim") or seed_config["hidden_size"] // seed_config["num_attention_heads"]
    )
    width = seed_config["intermediate_size"]
    moe = {"num_experts_per_tok": TOP_K, "router_aux_loss_coef": ROUTER_AUX_LOSS_COEF, "intermediate_size": width}
    if family == "mixtral":
        moe["num_local_experts"] = num_experts
    else:
        moe.update(num_experts=num_experts, moe_intermediate_size=width, norm_topk_prob=True)
        moe.update(decoder_sparse_step=1, mlp_only_layers=[])
    if family == "qwen2_moe":
        moe.update(shared_expert_intermediate_size=width, qkv_bias=True)
    config = AutoConfig.for_model(family, **{**carried, **moe})
    for key in MUST_CARRY:
        if key in seed_config and getattr(config, key, None) != seed_config[key]:
            became = getattr(config, key, None)
            raise BTXError(f"{family} cannot carry the seed's {key}={seed_config[key]!r} (it became {became!r})")
    return config


def _build(config: PretrainedConfig, seed: DenseCheckpoint, dtype: torch.dtype) -> PreTrainedModel:
    """The empty target model (every parameter is written after), checked to hold the seed's non-FFN tensors."""
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()
    ours = {n: tuple(p.shape) for n, p in model.named_parameters() if not FFN_PARAM.match(n)}
    theirs = {n: shape for n, (_, shape) in seed.headers.items() if not FFN_PARAM.match(n)}
    if ours != theirs:
        differ = sorted(set(ours.items()) ^ set(theirs.items()))[:4]
        raise BTXError(
            f"a {config.model_type} model does not hold the seed's non-FFN tensors one for one (differing: "
            f"{', '.join(f'{n} {list(s)}' for n, s in differ)}). Merge into the family named for the seed"
        )
    view = ExpertView(model)
    if view.moe_layers != list(range(config.num_hidden_layers)):
        raise BTXError(f"the {config.model_type} model has MoE blocks in layers {view.moe_layers}, not in every layer")
    return model.eval()


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
        for layer in view.moe_layers:
            for expert, source in enumerate(sources):
                ffn = source.ffn(layer)
                view.write_expert((layer, expert), fuse_experts(ffn["gate_proj"], ffn["up_proj"], ffn["down_proj"]))
            router = view.router_weight(layer)
            view.write_router_rows(layer, list(range(len(sources))), routers_LEH[layer].to(router.dtype))
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


def merge_branches(
    seed_path: str | Path,
    branch_paths: Sequence[str | Path],
    out_dir: str | Path,
    *,
    family: str | None = None,
    generalist: bool = False,
    shared: str = "average",
    router_init: str | torch.Tensor = "random",
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Merge dense ``branch_paths`` (trained from ``seed_path``) into an MoE checkpoint at ``out_dir`` (returned).
    ``family`` defaults to the seed's (llama -> mixtral, qwen3 -> qwen3_moe, qwen2 -> qwen2_moe); see the module
    docstring for what each expert and tensor becomes and what is refused."""
    seed_dir = Path(seed_path).expanduser().resolve()
    branch_dirs = [Path(p).expanduser().resolve() for p in branch_paths]
    if len(branch_dirs) < 2:
        raise BTXError(f"BTX merges at least 2 branches, got {len(branch_dirs)}: {[str(p) for p in branch_dirs]}")
    for i, path in enumerate(branch_dirs):
        if path == seed_dir:
            raise BTXError(f"branch {i} ('{path}') is the seed itself: pass the branches trained from it")
        if path in branch_dirs[:i]:
            raise BTXError(f"branch {i} ('{path}') is also branch {branch_dirs.index(path)}: pass each branch once")
    inputs = {"the seed checkpoint": seed_dir, **{f"branch {i}": p for i, p in enumerate(branch_dirs)}}
    out = check_out_dir(out_dir, overwrite, inputs)
    base = DenseCheckpoint(seed_dir, "the seed")
    branches = [DenseCheckpoint(p, f"branch {i}") for i, p in enumerate(branch_dirs)]
    given = isinstance(router_init, torch.Tensor)
    options = BTXOptions(_check_seed(base, family), generalist, shared, "given" if given else router_init, seed)
    for branch in branches:
        _check_inputs(base, branch)
    dtype, config = base.dtype(), base.config
    num_experts = len(branches) + int(generalist)
    shape_LEH = (int(config["num_hidden_layers"]), num_experts, int(config["hidden_size"]))
    std = float(config.get("initializer_range", 0.02))
    routers_LEH = _router_rows(router_init, seed, shape_LEH, std)
    model = _build(target_config(config, options.family, num_experts), base, dtype)
    fingerprints = [checkpoint_fingerprint(c.path) for c in [base, *branches]]
    if len(set(fingerprints[1:])) < len(branches):
        log.warning("two or more branches hold the same weights: their experts will be identical")
    log.info("merging %d branches of %s into %s, %d experts per layer", len(branches), seed_dir, out, num_experts)
    _fill(model, base, branches, options, routers_LEH)
    experts = [f"branch {i}" for i in range(len(branches))] + (["seed (generalist)"] if generalist else [])
    provenance = {
        "schema": SCHEMA,
        "method": "branch-train-mix merge (Sukhbaatar et al. 2024)",
        "seed": {"path": str(seed_dir), "fingerprint": fingerprints[0], "model_type": config["model_type"]},
        "branches": [{"path": str(b.path), "fingerprint": f} for b, f in zip(branches, fingerprints[1:])],
        "options": asdict(options),
        "experts": experts,
        "shared_expert": "seed FFN, gate weight 0 (scale 0.5)" if options.family == "qwen2_moe" else None,
        "router": {
            "top_k": TOP_K,
            "norm_topk_prob": True,
            "aux_loss_coef": ROUTER_AUX_LOSS_COEF,
            "init": "given tensor" if given else f"normal(0, {std}), seed {seed}",
        },
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    with staged_dir(out) as stage:
        model.save_pretrained(stage, safe_serialization=True)
        for name, file in base.tokenizer_files().items():
            shutil.copy2(file, stage / name)
        if (seed_dir / "generation_config.json").is_file():
            shutil.copy2(seed_dir / "generation_config.json", stage / "generation_config.json")
        (stage / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    log.info("BTX checkpoint written to %s (%s)", out, ", ".join(experts))
    return out
