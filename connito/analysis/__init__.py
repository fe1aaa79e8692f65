"""Read-only analysis of what experts do (layer 5): streaming routing statistics and what they imply, driver
experts by causal scan, reweighting, and the ``connito analyze`` report.

``analysis`` is the layer below the other methods: ``adaptation`` (selection reads its scores), ``composition``
and ``retirement`` (pruning, merging and sharing read its statistics and drivers) may import it; it imports none of
them, nor ``orchestration`` or ``cli`` (``tests/test_layering.py`` checks it). It reads models, experts, data,
routing and training only.

Import from the modules (``connito.analysis.statistics``, ``.summaries``, ``.drivers``, ``.reweighting``,
``.run``); this package file stays light so reading the command's config does not load torch.
"""
