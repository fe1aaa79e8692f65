"""Expert addressing and model-family adapters (layer 1): everything above talks to experts only through this.

Shape legend used across the package: L decoder layers, E routed experts per MoE layer, H hidden size,
I routed expert FFN width.
"""

from connito.experts.adapter import ExpertParamSlice, MoEAdapter, MoELayout, ParameterCount
from connito.experts.addressing import ExpertAddressError, ExpertId, ExpertMask, check_expert_id
from connito.experts.registry import adapter_for, register_adapter, supported_model_types

__all__ = [
    "ExpertAddressError",
    "ExpertId",
    "ExpertMask",
    "ExpertParamSlice",
    "MoEAdapter",
    "MoELayout",
    "ParameterCount",
    "adapter_for",
    "check_expert_id",
    "register_adapter",
    "supported_model_types",
]
