"""Tiny models of every MoE family the expert view supports (hidden 64, 3 layers, 8 experts, top-2)."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

BASE = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 64,
    "initializer_range": 0.2,  # large enough that routers spread tokens over experts
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
DEEPSEEK = {
    "n_routed_experts": 8,
    "n_shared_experts": 1,
    "moe_intermediate_size": 32,
    "first_k_dense_replace": 1,
    "kv_lora_rank": 16,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    "num_key_value_heads": 4,
}
TINY = {
    "qwen3_moe": {"num_experts": 8, "moe_intermediate_size": 32, "head_dim": 16},
    "qwen2_moe": {"num_experts": 8, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 48},
    "mixtral": {"num_local_experts": 8, "head_dim": 16},
    "olmoe": {"num_experts": 8},
    "flex_olmo": {"num_experts": 8},
    "deepseek_v2": dict(DEEPSEEK, q_lora_rank=None),
    "deepseek_v3": dict(DEEPSEEK, q_lora_rank=32, n_group=2, topk_group=1),
}
DENSE_LAYERS = {"deepseek_v2": [0], "deepseek_v3": [0]}


def build_tiny(model_type: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **{**BASE, **TINY[model_type], **overrides})
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(params=sorted(TINY))
def model_type(request) -> str:
    return request.param


@pytest.fixture
def tiny_model(model_type):
    return build_tiny(model_type)


@pytest.fixture
def tiny_builder():
    """``build_tiny(model_type, seed=0, **config_overrides)`` for tests that need a variant."""
    return build_tiny


@pytest.fixture
def expected_moe_layers(model_type) -> list[int]:
    """Layers with an MoE block in the tiny model: all 3, minus DeepSeek's first_k_dense_replace=1 dense layer."""
    return [layer for layer in range(BASE["num_hidden_layers"]) if layer not in DENSE_LAYERS.get(model_type, [])]
