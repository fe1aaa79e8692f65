"""What writing an MoE checkpoint from dense ones takes, shared by the BTX merge and FlexOLMo's owner checkpoints.

A dense seed (or public) checkpoint is read tensor by tensor (:class:`DenseCheckpoint`); :func:`check_seed` picks
the MoE family with the very same attention, norms and RoPE (llama -> mixtral, qwen3 -> qwen3_moe, qwen2 ->
qwen2_moe, see :mod:`connito.composition.btx_merge` for the table) and refuses what that family cannot hold
exactly; :func:`target_config` is the MoE config with the seed's keys; :func:`build_moe` the empty model, checked to
hold the seed's non-FFN tensors one for one; :func:`write_checkpoint` writes it all at once with the seed's
tokenizer files, generation config and a provenance file. Every check raises the caller's error class, with the
caller's method name in the message.

Shape legend: L decoder layers, E experts per layer, H hidden size.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.initialization import no_init_weights

from connito.common.atomic import atomic_write_text
from connito.common.records import JsonRecord
from connito.experts.delta.manifest import file_sha256
from connito.experts.delta.staging import TOKENIZER_FILES, copy_tokenizer_files, staged_dir
from connito.experts.view import ExpertView
from connito.models.families import ModelError
from connito.models.loading import validate_checkpoint_dir

FAMILY_OF_SEED = {"llama": "mixtral", "qwen3": "qwen3_moe", "qwen2": "qwen2_moe"}
ATTENTION = {"llama": "no biases, no q/k norms", "qwen3": "q/k RMSNorms on the head dim", "qwen2": "q/k/v biases"}
SEED_OFF_KEYS = {"llama": ("attention_bias", "mlp_bias"), "qwen3": (), "qwen2": ()}
"""Seed config keys the target family has no place for: they must be false (off)."""
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
"""Config keys checkpoints of one lineage may differ in: bookkeeping, token ids (the tokenizer files are compared
instead) and training-only settings; the written model takes the seed's."""
NOT_CARRIED = frozenset(
    {"model_type", "architectures", "transformers_version", "_name_or_path", "dtype", "torch_dtype"}
)
MUST_CARRY = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size")
MUST_CARRY += ("tie_word_embeddings", "rms_norm_eps", "hidden_act", "max_position_embeddings", "rope_parameters")
FFN_PARAM = re.compile(r"^model\.layers\.(\d+)\.mlp\.(.+)$")
FFN_PROJS = ("gate_proj", "up_proj", "down_proj")
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class DenseCheckpoint:
    """A ``save_pretrained`` checkpoint read tensor by tensor (one or several safetensors files); errors are
    ``error`` (the caller's :class:`ModelError` subclass)."""

    def __init__(self, path: Path, what: str, error: type[ModelError] = ModelError):
        self.path, self.what, self.error = path, what, error
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
                raise self.error(f"{self}: cannot read {file.name} ({err}). Re-save it with save_pretrained") from None
        return self._handles[file]

    def tensor(self, name: str) -> torch.Tensor:
        return self._open(self.files[name]).get_tensor(name)

    def ffn(self, layer: int) -> dict[str, torch.Tensor]:
        return {proj: self.tensor(f"model.layers.{layer}.mlp.{proj}.weight") for proj in FFN_PROJS}

    def dtype(self) -> torch.dtype:
        dtypes = sorted({dtype for dtype, _ in self.headers.values()})
        if len(dtypes) != 1 or dtypes[0] not in SAFETENSORS_DTYPES:
            raise self.error(f"{self} holds tensors of dtypes {dtypes}; expected checkpoints of one float dtype")
        return SAFETENSORS_DTYPES[dtypes[0]]

    def tokenizer_files(self) -> dict[str, Path]:
        return tokenizer_files(self.path)


def tokenizer_files(path: Path) -> dict[str, Path]:
    """A checkpoint directory's tokenizer files by name."""
    return {f.name: f for pattern in TOKENIZER_FILES for f in sorted(Path(path).glob(pattern)) if f.is_file()}


def check_seed(
    seed: DenseCheckpoint,
    family: str | None,
    *,
    method: str,
    error: type[ModelError],
    families: dict[str, str] = FAMILY_OF_SEED,
) -> str:
    """The target family for this seed (``families`` maps the dense model types ``method`` takes to theirs), or
    ``error`` when that family cannot hold the seed exactly."""
    config, seed_type = seed.config, seed.config["model_type"]
    natural = families.get(seed_type)
    if natural is None:
        raise error(
            f"{seed} is a {seed_type} model; {method} takes dense {', '.join(families)} checkpoints "
            f"(into {', '.join(f'{k}->{v}' for k, v in families.items())})"
        )
    family = family or natural
    if family not in families.values():
        raise error(f"family='{family}' is not one {method} writes: {', '.join(families.values())}")
    if family != natural:
        other = next(k for k, v in families.items() if v == family)
        raise error(
            f"family='{family}' cannot hold a {seed_type} seed's attention exactly ({seed_type}: "
            f"{ATTENTION[seed_type]}; {family}: {ATTENTION[other]}). Write {seed_type} checkpoints into "
            f"family='{natural}'"
        )
    for key in SEED_OFF_KEYS[seed_type]:
        if config.get(key):
            raise error(f"{seed} has {key}={config[key]!r}; {family} has no place for it (it must be false)")
    if config.get("use_sliding_window") or any(t != "full_attention" for t in config.get("layer_types") or []):
        raise error(f"{seed} has sliding-window attention layers; {method} takes full-attention checkpoints only")
    layers = int(config["num_hidden_layers"])
    expected = [f"model.layers.{layer}.mlp.{proj}.weight" for layer in range(layers) for proj in FFN_PROJS]
    missing = [name for name in expected if name not in seed.headers]
    if missing:
        raise error(f"{seed} has no FFN tensor '{missing[0]}': not a dense {seed_type} checkpoint")
    for name in seed.headers:
        match = FFN_PARAM.match(name)
        if match and (int(match[1]) >= layers or match[2] not in {f"{p}.weight" for p in FFN_PROJS}):
            raise error(
                f"{seed}: FFN tensor '{name}' has no place in a {family} expert (bias-free SwiGLU gate/up/down_proj)"
            )
    return family


def given_router_rows(
    rows: torch.Tensor,
    shape_LEH: tuple[int, int, int],
    *,
    order: str,
    error: type[ModelError],
    name: str = "router_init",
) -> torch.Tensor:
    """A given router-weight tensor (the argument ``name``), [E, H] (every layer) or [L, E, H], as [L, E, H] on the
    CPU; ``order`` says which expert each row is (for the message)."""
    layers, experts, hidden = shape_LEH
    rows = rows.detach().cpu()
    if tuple(rows.shape) not in ((experts, hidden), shape_LEH) or not rows.is_floating_point():
        raise error(
            f"{name} is a {rows.dtype} tensor of shape {list(rows.shape)}; expected float [E, H] = "
            f"[{experts}, {hidden}] (every layer) or [L, E, H] = {list(shape_LEH)}, rows in expert order ({order})"
        )
    if not torch.isfinite(rows).all():
        raise error(f"{name} holds non-finite values")
    return rows.expand(shape_LEH) if rows.dim() == 2 else rows


def target_config(
    seed_config: dict,
    family: str,
    num_experts: int,
    *,
    top_k: int,
    error: type[ModelError] = ModelError,
    expert_width: int | None = None,
) -> PretrainedConfig:
    """The MoE config: the seed's attention, norm, RoPE and vocabulary keys, E experts of the dense FFN width (or
    ``expert_width``: FFNs split into chunks), top-k ``top_k`` (renormalised), load-balancing coefficient
    :data:`ROUTER_AUX_LOSS_COEF`. A qwen2_moe shared expert keeps the dense FFN width."""
    defaults = AutoConfig.for_model(family).to_dict()
    carried = {k: v for k, v in seed_config.items() if k in defaults and k not in NOT_CARRIED}
    carried["head_dim"] = (
        seed_config.get("head_dim") or seed_config["hidden_size"] // seed_config["num_attention_heads"]
    )
    width = seed_config["intermediate_size"]
    expert_width = expert_width or width
    moe = {"num_experts_per_tok": top_k, "router_aux_loss_coef": ROUTER_AUX_LOSS_COEF}
    if family == "mixtral":
        moe.update(num_local_experts=num_experts, intermediate_size=expert_width)
    else:
        moe.update(intermediate_size=width, num_experts=num_experts, moe_intermediate_size=expert_width)
        moe.update(norm_topk_prob=True)
        moe.update(decoder_sparse_step=1, mlp_only_layers=[])
    if family == "qwen2_moe":
        moe.update(shared_expert_intermediate_size=width, qkv_bias=True)
    config = AutoConfig.for_model(family, **{**carried, **moe})
    for key in MUST_CARRY:
        if key in seed_config and getattr(config, key, None) != seed_config[key]:
            became = getattr(config, key, None)
            raise error(f"{family} cannot carry the seed's {key}={seed_config[key]!r} (it became {became!r})")
    return config


def build_moe(
    config: PretrainedConfig, seed: DenseCheckpoint, dtype: torch.dtype, *, error: type[ModelError]
) -> PreTrainedModel:
    """The empty target model (every parameter is to be written), checked to hold the seed's non-FFN tensors."""
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()
    ours = {n: tuple(p.shape) for n, p in model.named_parameters() if not FFN_PARAM.match(n)}
    theirs = {n: shape for n, (_, shape) in seed.headers.items() if not FFN_PARAM.match(n)}
    if ours != theirs:
        differ = sorted(set(ours.items()) ^ set(theirs.items()))[:4]
        raise error(
            f"a {config.model_type} model does not hold the seed's non-FFN tensors one for one (differing: "
            f"{', '.join(f'{n} {list(s)}' for n, s in differ)}). Write into the family named for the seed"
        )
    view = ExpertView(model)
    if view.moe_layers != list(range(config.num_hidden_layers)):
        raise error(f"the {config.model_type} model has MoE blocks in layers {view.moe_layers}, not in every layer")
    return model.eval()


def write_checkpoint(
    model: PreTrainedModel, out: Path, seed_dir: Path, provenance_file: str, provenance: JsonRecord | Mapping
) -> None:
    """``model`` as a ``save_pretrained`` directory at ``out`` (written aside and renamed into place), with the
    seed's tokenizer files and generation config and ``provenance`` (a record of
    :mod:`connito.composition.provenance`, or a plain mapping) as JSON in ``provenance_file``."""
    with staged_dir(out) as stage:
        model.save_pretrained(stage, safe_serialization=True)
        copy_tokenizer_files(seed_dir, stage)
        if (seed_dir / "generation_config.json").is_file():
            shutil.copy2(seed_dir / "generation_config.json", stage / "generation_config.json")
        if isinstance(provenance, JsonRecord):
            provenance.save(stage / provenance_file)
        else:
            atomic_write_text(stage / provenance_file, json.dumps(dict(provenance), indent=2) + "\n")


def check_branch(seed: DenseCheckpoint, branch: DenseCheckpoint, error: type[ModelError]) -> None:
    """``branch`` has the seed's model_type, config (up to :data:`IGNORED_CONFIG_KEYS`), tensors and tokenizer
    (what BTX, BAM and BTS require of the branches they join)."""
    fix = "branches are trained from the seed and keep its architecture and tokenizer"
    if branch.config["model_type"] != seed.config["model_type"]:
        raise error(f"{branch} is a {branch.config['model_type']} model, the seed a {seed.config['model_type']}. {fix}")
    keys = sorted((set(seed.config) | set(branch.config)) - IGNORED_CONFIG_KEYS)
    differ = [k for k in keys if seed.config.get(k) != branch.config.get(k)]
    if differ:
        listed = "; ".join(f"'{k}': seed {seed.config.get(k)!r}, branch {branch.config.get(k)!r}" for k in differ[:4])
        raise error(f"{branch} has another config than the seed ({listed}). {fix}")
    names = set(seed.headers) ^ set(branch.headers)
    if names:
        where = "has no" if min(names) in seed.headers else "has an extra"
        raise error(f"{branch} {where} tensor '{min(names)}' (the seed's checkpoint differs). {fix}")
    for name, (dtype, shape) in seed.headers.items():
        (their_dtype, their_shape) = branch.headers[name]
        if their_shape != shape:
            raise error(f"{branch}: '{name}' has shape {list(their_shape)}, in the seed {list(shape)}. {fix}")
        if their_dtype != dtype:
            raise error(
                f"{branch}: '{name}' is {their_dtype}, in the seed {dtype}. Re-save the branch in the seed's dtype "
                "(experts are copied bit for bit, never cast)"
            )
    ours, theirs = seed.tokenizer_files(), branch.tokenizer_files()
    for name in sorted(theirs):
        if name not in ours:
            raise error(f"{branch} has tokenizer file '{name}', the seed has none: another tokenizer. {fix}")
        if file_sha256(ours[name]) != file_sha256(theirs[name]):
            raise error(f"{branch}: tokenizer file '{name}' differs from the seed's (sha256). {fix}")
