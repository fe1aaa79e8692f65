"""Adapting a model to a domain with only the experts it needs (layer 5): pick the experts from a routing
analysis and write them as an expert-mask file, then train only those.

Import from the modules (``connito.adaptation.selection`` for :func:`select_experts` and
:func:`load_analysis`, ``connito.experts.mask_file`` for the ``connito.mask/1`` file, ``connito.adaptation.run``
and ``connito.adaptation.config`` for ``connito select``); this package file stays light so reading the command's
config does not load torch.
"""
