"""Model classes Connito writes that no transformers family has (layer 1): each a standalone modeling file that
every ``save_pretrained`` of its classes copies into the checkpoint (``config.auto_map``), so plain transformers
builds them with ``trust_remote_code=True``; :func:`register_with_transformers` registers them with transformers'
Auto classes so Connito (and a Python user who calls it) loads them natively, without remote code. Their rows in
the family table are :mod:`connito.models.families`'.

- :mod:`connito.models.custom.modeling_connito_bam`: BAM, soft-routed attention experts beside the FFN experts.
- :mod:`connito.models.custom.modeling_connito_bts`: BTS, a frozen hub and branches joined by trained stitches.
- :mod:`connito.models.custom.modeling_connito_fft_moe`: FFT-MoE, a frozen base with sparse MoE adapters.
"""

from __future__ import annotations

_registered = False


def register_with_transformers() -> None:
    """Register every custom config and model class with ``AutoConfig`` / ``AutoModelForCausalLM`` (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AutoConfig, AutoModelForCausalLM

    from connito.models.custom.modeling_connito_bam import BAM_CLASSES
    from connito.models.custom.modeling_connito_bts import ConnitoBtsConfig, ConnitoBtsForCausalLM
    from connito.models.custom.modeling_connito_fft_moe import ConnitoFftMoeConfig, ConnitoFftMoeForCausalLM

    custom = [(ConnitoBtsConfig, ConnitoBtsForCausalLM), (ConnitoFftMoeConfig, ConnitoFftMoeForCausalLM)]
    for config_cls, model_cls in [*BAM_CLASSES.values(), *custom]:
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)
    _registered = True
