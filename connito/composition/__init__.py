"""Composition (layer 5): put experts trained apart into one model, or take them out again. Pure functions from
checkpoints to checkpoints, and inference-time router edits; experts are reached only through
:mod:`connito.experts`.

- :mod:`connito.composition.btx_merge`: Branch-Train-MiX's merge step (Sukhbaatar et al. 2024): N dense branches of
  one seed become the experts of one MoE checkpoint, everything else averaged.
- :mod:`connito.composition.opt_out`: FlexOLMo-style opt-out (Shi et al. 2025): take experts out at inference with a
  router edit, or write the model without them.
"""
