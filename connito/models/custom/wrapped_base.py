"""What Connito's models that wrap a whole base causal LM share: BTS (its hub, ``hub``) and FFT-MoE (its frozen base,
``base``), both built from the base's own config stored as ``config.base_config``.

Standalone like the modeling files (torch and transformers only). They import it relatively
(``from .wrapped_base import ...``): ``save_pretrained`` copies a modeling file's relative imports into the
checkpoint beside it, and ``trust_remote_code=True`` loads them from there, so the checkpoint stays loadable by
plain transformers.
"""

from __future__ import annotations

from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel


def base_config_of(config: PretrainedConfig) -> PretrainedConfig:
    """The wrapped base's own config (``config.base_config``), with the wrapper's attention implementation."""
    base = AutoConfig.for_model(**config.base_config)
    base._attn_implementation = config._attn_implementation
    return base


class WrappedBaseModel(PreTrainedModel):
    """A model holding a whole base causal LM at ``base_model_prefix`` plus modules of its own; those whose
    ``zero_init`` is set start (and are re-initialised) at zero, so the untrained model computes the base's logits."""

    _supports_sdpa = True
    _supports_attention_backend = True
    _no_split_modules = []

    def _init_weights(self, module):
        if getattr(module, "zero_init", False):
            nn.init.zeros_(module.weight)
        else:
            super()._init_weights(module)

    def get_input_embeddings(self):
        return getattr(self, self.base_model_prefix).get_input_embeddings()

    def get_output_embeddings(self):
        return getattr(self, self.base_model_prefix).get_output_embeddings()
