"""Build a tiny model of a family, or load a local Hugging Face checkpoint, for training."""

import json
import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from connito.models.config import ModelConfig
from connito.models.custom import register_with_transformers
from connito.models.families import Family, ModelError, get_family

register_with_transformers()  # Connito's own model classes (BAM) load natively, without remote code

log = logging.getLogger("connito.models")

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def validate_checkpoint_dir(path: str | Path, setting: str = "model.path") -> dict:
    """Check that ``path`` is a ``save_pretrained`` directory with complete safetensors files and return its parsed
    ``config.json``; ``setting`` is the option that named it, for the messages."""
    path = Path(path).expanduser()
    fix = f"Point {setting} at a directory written by save_pretrained (config.json + *.safetensors)."
    if not path.is_dir():
        raise ModelError(f"{setting}='{path}' does not exist or is not a directory. {fix}")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelError(f"{setting}='{path}' is not a Hugging Face checkpoint: it has no config.json. {fix}")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelError(f"{setting}='{path}': config.json is not valid JSON ({err}). {fix}") from None
    if "model_type" not in config:
        raise ModelError(f"{setting}='{path}': config.json has no 'model_type'. {fix}")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise ModelError(
            f"{setting}='{path}' has no safetensors weights ({' or '.join(WEIGHT_FILES)}). Connito never "
            f"unpickles weights: re-save the checkpoint with save_pretrained(..., safe_serialization=True). {fix}"
        )
    check_safetensors_files(path)
    return config


def safetensors_problem(file: Path) -> str | None:
    """What is wrong with the safetensors ``file`` judged by its header and size alone (nothing is loaded), or None:
    the header must parse and the last tensor must end where the file ends."""
    size = file.stat().st_size
    with file.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"it is {size} bytes long, shorter than a safetensors header"
        length = int.from_bytes(head, "little")
        if 8 + length > size:
            return f"its header claims {length} bytes but the file has {size}: it is truncated"
        try:
            header = json.loads(f.read(length).decode("utf-8"))
            ends = [int(entry["data_offsets"][1]) for name, entry in header.items() if name != "__metadata__"]
        except (ValueError, KeyError, TypeError, IndexError):
            return "its header is not valid safetensors JSON: the file is corrupt"
    expected = 8 + length + max(ends, default=0)
    if expected > size:
        return f"its tensors need {expected} bytes but the file has {size}: it is truncated"
    if expected < size:
        return f"it has {size - expected} bytes after its last tensor: it is corrupt"
    return None


def check_safetensors_files(directory: str | Path) -> None:
    """Refuse a checkpoint directory holding a truncated or corrupt ``*.safetensors`` file, naming the file."""
    for file in sorted(Path(directory).expanduser().glob("*.safetensors")):
        problem = safetensors_problem(file)
        if problem is not None:
            raise ModelError(
                f"'{file}' is not a complete safetensors file ({problem}); it was not written or copied completely. "
                "Copy it again from its source, or save the checkpoint again with save_pretrained"
            )


def tokenizer_token_ids(tokenizer) -> dict[str, int]:
    """The bos/eos/pad ids a new model's config should carry for this tokenizer."""
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    ids["pad_token_id"] = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return {k: v for k, v in ids.items() if v is not None}


def has_tokenizer(path: str | Path) -> bool:
    path = Path(path).expanduser()
    return (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()


def resolve_family(cfg: ModelConfig) -> Family:
    if cfg.path:
        return get_family(validate_checkpoint_dir(cfg.path)["model_type"])
    return get_family(cfg.family)


def build_hf_config(cfg: ModelConfig, vocab_size: int, token_ids: dict[str, int] | None = None) -> PretrainedConfig:
    """The HF config to train with. ``token_ids`` (bos/eos/pad ids of the tokenizer) replace a new model's
    defaults, which are the ids of the family's original vocabulary and may not even exist in ours."""
    family = resolve_family(cfg)
    if cfg.path:
        config = AutoConfig.from_pretrained(cfg.path, local_files_only=True)
        if config.vocab_size < vocab_size:
            raise ModelError(
                f"the checkpoint at model.path has vocab_size {config.vocab_size} but the tokenizer has {vocab_size} "
                "tokens. Tokenize with the checkpoint's own tokenizer (data.tokenizer_path=<model.path>)."
            )
    else:
        try:
            config = AutoConfig.for_model(
                family.model_type, **{**cfg.hf_config, **(token_ids or {}), "vocab_size": vocab_size}
            )
        except (TypeError, ValueError) as err:
            raise ModelError(f"model.hf_config is not valid for family '{family.model_type}': {err}") from None
    if family.is_moe:
        config.output_router_logits = family.has_aux_loss and cfg.aux_loss_coef > 0
        config.router_aux_loss_coef = cfg.aux_loss_coef
    if cfg.aux_loss_coef > 0 and not family.has_aux_loss and family.is_moe:
        log.info(
            "family %s: %s; model.aux_loss_coef=%g weighs DeepSeek-V2's expert-level balance loss (megatron-core)",
            family.model_type, family.notes, cfg.aux_loss_coef,
        )  # fmt: skip
    return config


def build_model(
    cfg: ModelConfig, vocab_size: int, seed: int, token_ids: dict[str, int] | None = None
) -> PreTrainedModel:
    """The model to train, in fp32 on CPU (the engine moves and casts it)."""
    config = build_hf_config(cfg, vocab_size, token_ids)
    if cfg.path:
        log.info("loading checkpoint %s", cfg.path)
        return AutoModelForCausalLM.from_pretrained(cfg.path, config=config, local_files_only=True, dtype=torch.float32)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    log.info("built %s (%s) with %.2fM parameters", cfg.name, config.model_type, model.num_parameters() / 1e6)
    return model


def checkpoint_parameters(checkpoint: str | Path) -> int:
    """The number of parameters in a ``save_pretrained`` directory's safetensors files, read from their headers
    (nothing is loaded)."""
    import math

    from safetensors import safe_open

    total = 0
    for file in sorted(Path(checkpoint).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                total += math.prod(f.get_slice(name).get_shape())
    return total


def model_like(model, config, state: dict):
    """A new model of ``model``'s class built from ``config`` holding the tensors ``state`` (strict), in
    ``model``'s dtype, device, generation config and train/eval mode; non-persistent buffers (rotary frequencies)
    are copied from ``model`` where their shapes match. What a checkpoint surgery (removing, merging or moving
    experts) builds its result with; ``model`` is not changed."""
    import copy

    from transformers.initialization import no_init_weights

    with no_init_weights():
        new = type(model)._from_config(config, dtype=model.dtype)
    new.to(model.device)
    new.load_state_dict(state, strict=True)
    live = new.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, tensor in live.items():  # a tensor the class builds in another dtype keeps the source's
            if tensor.dtype != state[name].dtype:
                tensor.data = state[name].clone()
        buffers = dict(model.named_buffers())
        for name, buffer in new.named_buffers():
            if name not in live and name in buffers and buffers[name].shape == buffer.shape:
                buffer.copy_(buffers[name])
    new.generation_config = copy.deepcopy(model.generation_config)
    new.train(model.training)
    return new
