"""Typed config of the model to train (Hydra group ``model``)."""

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ModelConfig:
    """Which model to train.

    Either a tiny model of a transformers MoE family built from ``hf_config`` (random init; what the demos and
    tests use), or a local Hugging Face checkpoint directory given by ``path`` (what users fine-tune).
    """

    name: str = "qwen3_moe_tiny"
    """Short label used in run names and logs."""
    family: str = "qwen3_moe"
    """transformers ``model_type`` of the family (see ``connito.models.families.FAMILIES``)."""
    path: str | None = None
    """Local directory written by ``save_pretrained``. When set, ``family`` and ``hf_config`` are read from it."""
    hf_config: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the family's config class for a model built from scratch (vocab_size is set
    from the tokenizer)."""
    aux_loss_coef: float = 0.01
    """Coefficient of the family's load-balancing loss (0 turns it off): transformers' own where the family has one,
    else DeepSeek-V2's expert-level balance loss (megatron-core's Switch loss, :mod:`connito.routing.balancing`)."""
    device_aux_loss_coef: float = 0.0
    """Coefficient of DeepSeek-V2's device-level balance loss (DeepSeek-V2 trains with 0.05; V2-Lite, which runs no
    expert parallelism, with none): the experts of each expert-parallel rank are one device group, so it needs
    ``parallel.ep_size > 1``; any MoE family."""
    seq_aux_loss_coef: float = 0.0
    """Coefficient of DeepSeek-V3's sequence-wise balance loss (DeepSeek-V3 trains with 0.0001); any MoE family."""
    z_loss_coef: float = 0.0
    """Coefficient of the router z-loss (ST-MoE; 0.001 there); any MoE family."""
    expert_bias_update_rate: float = 0.0
    """DeepSeek-V3's auxiliary-loss-free balancing: after every step each layer's ``e_score_correction_bias`` moves
    by this much towards the mean expert load (DeepSeek-V3: 0.001). Families with a choice bias only."""
