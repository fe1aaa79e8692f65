"""The adapter registry: ``model_type`` -> :class:`MoEAdapter`, with the transformers 5.x families built in.

A user family plugs in without forking::

    register_adapter("my_moe", MoEAdapter("my_moe", MoELayout(num_experts_key="n_experts")))

What each built-in family keeps where (checked against transformers 5.22 ``modeling_<family>.py``). Routers are
``<Family>TopKRouter`` modules with a bare ``weight`` [E, H] Parameter returning ``(logits, top-k weights,
top-k ids)``; experts are ``<Family>Experts`` with fused ``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I].

| model_type  | routed experts (config) | top-k choice                                  | shared experts           |
|-------------|-------------------------|-----------------------------------------------|--------------------------|
| qwen3_moe   | num_experts             | softmax, top-k, optional renorm               | none                     |
| qwen2_moe   | num_experts             | softmax, top-k, optional renorm               | shared_expert + gate |
| mixtral     | num_local_experts       | softmax, top-k, always renorm                 | none                     |
| olmoe       | num_experts             | softmax, top-k, optional renorm               | none                     |
| flex_olmo   | num_experts             | softmax, top-k, optional renorm               | none                     |
| deepseek_v2 | n_routed_experts        | softmax, greedy or group-limited top-k, scaled | shared_experts (one MLP) |
| deepseek_v3 | n_routed_experts        | sigmoid + correction bias, group top-k, scaled | shared_experts (one MLP) |

Dense layers: Qwen MoE families by ``mlp_only_layers`` / ``decoder_sparse_step``, DeepSeek by
``first_k_dense_replace``; :meth:`MoEAdapter.moe_layers` finds them by looking, not by re-deriving the rule.
"""

from __future__ import annotations

from torch import nn

from connito.experts.adapter import MoEAdapter, MoELayout

_ADAPTERS: dict[str, MoEAdapter] = {}


def register_adapter(model_type: str, adapter: MoEAdapter, *, replace: bool = False) -> MoEAdapter:
    """Make ``adapter_for`` answer ``adapter`` for models whose ``config.model_type`` is ``model_type``."""
    if model_type in _ADAPTERS and not replace:
        raise ValueError(
            f"an expert adapter for model_type '{model_type}' is already registered; pass replace=True to override it"
        )
    _ADAPTERS[model_type] = adapter
    return adapter


def supported_model_types() -> list[str]:
    return sorted(_ADAPTERS)


def adapter_for(model: nn.Module | str) -> MoEAdapter:
    """The adapter for a transformers model (by ``model.config.model_type``) or for a model_type string."""
    if isinstance(model, str):
        model_type = model
    else:
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        if model_type is None:
            raise ValueError(
                f"{type(model).__name__} has no config.model_type; pass a transformers model or a model_type string"
            )
    try:
        return _ADAPTERS[model_type]
    except KeyError:
        raise ValueError(
            f"no expert adapter for model_type '{model_type}'. Supported families: "
            f"{', '.join(supported_model_types())}. Register one with connito.experts.register_adapter."
        ) from None


for _model_type, _layout in {
    "qwen3_moe": MoELayout(),
    "qwen2_moe": MoELayout(shared_experts_attr="shared_expert", shared_expert_gate_attr="shared_expert_gate"),
    "mixtral": MoELayout(num_experts_key="num_local_experts"),
    "olmoe": MoELayout(),
    "flex_olmo": MoELayout(),
    "deepseek_v2": MoELayout(num_experts_key="n_routed_experts", shared_experts_attr="shared_experts"),
    "deepseek_v3": MoELayout(
        num_experts_key="n_routed_experts",
        shared_experts_attr="shared_experts",
        router_bias_attr="e_score_correction_bias",
    ),
}.items():
    register_adapter(_model_type, MoEAdapter(_model_type, _layout))
