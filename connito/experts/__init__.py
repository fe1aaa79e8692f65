"""The one view of a model's experts (layer 1): everything above reaches experts only through this package.

Shape legend used across the package: L decoder layers, E routed experts per MoE layer, H hidden size,
I routed expert FFN width, N expert-parallel size.
"""

from connito.experts.addressing import ExpertAddressError, ExpertId, ExpertMask, check_expert_id
from connito.experts.blocks import ExpertParamSlice, MoEBlock, autoep_layer_class
from connito.experts.view import ExpertView, ParameterCount, decoder_layers, family_of

__all__ = [
    "ExpertAddressError",
    "ExpertId",
    "ExpertMask",
    "ExpertParamSlice",
    "ExpertView",
    "MoEBlock",
    "ParameterCount",
    "autoep_layer_class",
    "check_expert_id",
    "decoder_layers",
    "family_of",
]
