"""BAM models (Zhang et al. 2024, "BAM! Just Like That"): a transformers MoE family whose attention is a mixture of
attention experts as well. Standalone (torch and transformers only): Connito imports it natively, and
``save_pretrained`` copies this very file into the checkpoint with ``config.auto_map``, so
``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` builds the same model in any process.

One class pair per base family, each the family's own model with every decoder layer's ``self_attn`` replaced:

| config / model class                          | model_type              | base (FFN experts, norms, RoPE) |
|-----------------------------------------------|-------------------------|---------------------------------|
| ConnitoBamQwen3MoeConfig / ...ForCausalLM     | connito_bam_qwen3_moe   | qwen3_moe (q/k norms)           |
| ConnitoBamMixtralConfig / ...ForCausalLM      | connito_bam_mixtral     | mixtral (no biases)             |
| ConnitoBamQwen2MoeConfig / ...ForCausalLM     | connito_bam_qwen2_moe   | qwen2_moe (q/k/v biases)        |

**Attention experts, soft-routed** (BAM's best variant): every token runs all ``attention_experts`` experts and mixes
their outputs with a per-layer router, ``softmax(W_r x)`` [T, N] (``self_attn.router.weight`` [N, H]):
``y = sum_i p_i(x) * o_i(Attn(q_i(x), k_i(x), v_i(x)))``. Expert i holds the family's q/k/v/o projections (and q/k
norms, biases) under ``self_attn.experts.<i>``. With ``kv_sharing`` (BAM's key/value-sharing variant) the experts
keep their own q and o projections (and q norm) but share one ``self_attn.k_proj``/``v_proj`` (and ``k_norm``), so
keys and values are computed and cached once. All experts' heads run in one attention call (their heads side by
side, each expert's query heads reading its own key/value heads); the KV cache holds one entry per layer with every
expert's keys and values (once, with sharing).

**Block**: sequential (the family's: ``x + attn(n1(x))`` then ``+ ffn(n2(.))``) or, with ``parallel_block``,
BAM's parallel attention + FFN: ``y = x + attn(n1(x)) + ffn(n2(x))``, both reading the layer's input (each through
its own pre-norm). A seed trained sequentially computes something else in a parallel block: the FFN no longer sees
the attention's output, so the upcycled model starts away from its branches and needs the fine-tuning stage to
recover.

With every expert equal (and the sequential block) the layer computes the family's attention exactly, up to float
summation order, because the router's weights sum to 1.
"""

from __future__ import annotations

import importlib

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

BAM_KEYS = ("attention_experts", "kv_sharing", "parallel_block")


class _AttentionExpert(nn.Module):
    """One attention expert's own projections (without k/v under key/value sharing)."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, spec: dict, norm_cls, eps, shared_kv):
        super().__init__()
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=spec["qkv_bias"])
        if not shared_kv:
            self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=spec["qkv_bias"])
            self.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=spec["qkv_bias"])
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=spec["o_bias"])
        if spec["qk_norm"]:
            self.q_norm = norm_cls(head_dim, eps=eps)
            if not shared_kv:
                self.k_norm = norm_cls(head_dim, eps=eps)


class SoftAttentionExperts(nn.Module):
    """A decoder layer's attention as ``config.attention_experts`` soft-routed experts; see the module docstring."""

    def __init__(self, config, layer_idx: int, spec: dict, base_module):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_experts = int(config.attention_experts)
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_kv_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.kv_sharing = bool(config.kv_sharing)
        self.qk_norm = spec["qk_norm"]
        self._apply_rope = base_module.apply_rotary_pos_emb
        self._eager = base_module.eager_attention_forward
        norm_cls, eps = getattr(base_module, spec["norm"]), config.rms_norm_eps
        hidden = config.hidden_size
        self.router = nn.Linear(hidden, self.num_experts, bias=False)
        self.experts = nn.ModuleList(
            _AttentionExpert(
                hidden, self.num_heads, self.num_kv_heads, self.head_dim, spec, norm_cls, eps, self.kv_sharing
            )
            for _ in range(self.num_experts)
        )
        if self.kv_sharing:
            self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=spec["qkv_bias"])
            self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=spec["qkv_bias"])
            if self.qk_norm:
                self.k_norm = norm_cls(self.head_dim, eps=eps)

    def _keys_values(self, owner: nn.Module, hidden_states: torch.Tensor, shape) -> tuple[torch.Tensor, torch.Tensor]:
        keys = owner.k_proj(hidden_states).view(shape)
        if self.qk_norm:
            keys = owner.k_norm(keys)
        return keys.transpose(1, 2), owner.v_proj(hidden_states).view(shape).transpose(1, 2)

    def forward(self, hidden_states, position_embeddings, attention_mask, past_key_values=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        shape = (*input_shape, -1, self.head_dim)
        weights = torch.softmax(self.router(hidden_states), dim=-1, dtype=torch.float32).to(hidden_states.dtype)
        cos, sin = position_embeddings
        queries = []
        for expert in self.experts:
            query = expert.q_proj(hidden_states).view(shape)
            queries.append((expert.q_norm(query) if self.qk_norm else query).transpose(1, 2))
        query_states = torch.cat(queries, dim=1)  # [B, N * heads, S, D]: expert i's heads side by side
        owners = [self] if self.kv_sharing else list(self.experts)
        pairs = [self._keys_values(owner, hidden_states, shape) for owner in owners]
        key_states = torch.cat([k for k, _ in pairs], dim=1)
        value_states = torch.cat([v for _, v in pairs], dim=1)
        query_states, key_states = self._apply_rope(query_states, key_states, cos, sin)
        if past_key_values is not None:
            key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)
        if self.kv_sharing:  # each expert's query heads read the one shared set of key/value heads
            key_states = key_states.repeat(1, self.num_experts, 1, 1)
            value_states = value_states.repeat(1, self.num_experts, 1, 1)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, self._eager)
        attn_output, _ = attention(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=None,
            **kwargs,
        )
        per_expert = attn_output.reshape(*input_shape, self.num_experts, self.num_heads * self.head_dim)
        output = None
        for i, expert in enumerate(self.experts):
            part = expert.o_proj(per_expert[..., i, :]) * weights[..., i : i + 1]
            output = part if output is None else output + part
        return output, None


_BASES = {
    # base model_type: (modeling module, config class, model class, decoder layer class, attention spec)
    "qwen3_moe": ("Qwen3Moe", {"qk_norm": True, "qkv_bias": "attention_bias", "o_bias": "attention_bias"}),
    "mixtral": ("Mixtral", {"qk_norm": False, "qkv_bias": None, "o_bias": None}),
    "qwen2_moe": ("Qwen2Moe", {"qk_norm": False, "qkv_bias": "qkv_bias", "o_bias": None}),
}


def _spec(config, template: dict, prefix: str) -> dict:
    def flag(key):
        return bool(getattr(config, key, False)) if key else False

    return {
        "qk_norm": template["qk_norm"],
        "qkv_bias": flag(template["qkv_bias"]),
        "o_bias": flag(template["o_bias"]),
        "norm": f"{prefix}RMSNorm",
    }


def _make(base: str):
    prefix, template = _BASES[base]
    module = importlib.import_module(f"transformers.models.{base}.modeling_{base}")
    configuration = importlib.import_module(f"transformers.models.{base}.configuration_{base}")
    base_config = getattr(configuration, f"{prefix}Config")
    base_layer = getattr(module, f"{prefix}DecoderLayer")
    base_model = getattr(module, f"{prefix}ForCausalLM")

    @strict
    class Config(base_config):
        model_type = f"connito_bam_{base}"
        attention_experts: int = 2
        """Attention experts per layer (BAM: one per branch)."""
        kv_sharing: bool = False
        """BAM's key/value-sharing variant: one k/v projection per layer, shared by the attention experts."""
        parallel_block: bool = False
        """BAM's parallel attention + FFN block (both read the layer's input); False: the family's sequential one."""
        bam_base_model_type: str = base
        """The transformers family this model extends."""

    class DecoderLayer(base_layer):
        def __init__(self, config, layer_idx: int):
            super().__init__(config, layer_idx)
            self.self_attn = SoftAttentionExperts(config, layer_idx, _spec(config, template, prefix), module)
            self.parallel_block = bool(config.parallel_block)

        def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                    use_cache=False, position_embeddings=None, **kwargs):  # fmt: skip
            if not self.parallel_block:
                return super().forward(
                    hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                    past_key_values=past_key_values, use_cache=use_cache, position_embeddings=position_embeddings,
                    **kwargs,
                )  # fmt: skip
            attention, _ = self.self_attn(
                hidden_states=self.input_layernorm(hidden_states), position_embeddings=position_embeddings,
                attention_mask=attention_mask, past_key_values=past_key_values, position_ids=position_ids,
                use_cache=use_cache, **kwargs,
            )  # fmt: skip
            ffn = self.mlp(self.post_attention_layernorm(hidden_states))
            if isinstance(ffn, tuple):  # families whose MoE block also returns router logits
                ffn = ffn[0]
            return hidden_states + attention + ffn

    class ForCausalLM(base_model):
        config_class = Config

        def __init__(self, config):
            super().__init__(config)
            self.model.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
            self.post_init()

    # Every save_pretrained of these classes copies this file beside the weights and writes config.auto_map
    # (transformers' custom_object_save), whoever saves them: a merge, a training run's export, surgery.
    Config._auto_class = "AutoConfig"
    ForCausalLM._auto_class = "AutoModelForCausalLM"
    name = "".join(part.capitalize() for part in base.split("_"))
    Config.__name__ = Config.__qualname__ = f"ConnitoBam{name}Config"
    DecoderLayer.__name__ = DecoderLayer.__qualname__ = f"ConnitoBam{name}DecoderLayer"
    ForCausalLM.__name__ = ForCausalLM.__qualname__ = f"ConnitoBam{name}ForCausalLM"
    return Config, ForCausalLM


ConnitoBamQwen3MoeConfig, ConnitoBamQwen3MoeForCausalLM = _make("qwen3_moe")
ConnitoBamMixtralConfig, ConnitoBamMixtralForCausalLM = _make("mixtral")
ConnitoBamQwen2MoeConfig, ConnitoBamQwen2MoeForCausalLM = _make("qwen2_moe")

BAM_CLASSES = {
    "qwen3_moe": (ConnitoBamQwen3MoeConfig, ConnitoBamQwen3MoeForCausalLM),
    "mixtral": (ConnitoBamMixtralConfig, ConnitoBamMixtralForCausalLM),
    "qwen2_moe": (ConnitoBamQwen2MoeConfig, ConnitoBamQwen2MoeForCausalLM),
}
"""Base family -> (config class, model class)."""
