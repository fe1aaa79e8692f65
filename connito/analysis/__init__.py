"""Read-only analysis of what experts do (layer 5): streaming routing statistics and what they imply, driver
experts by causal scan, reweighting, and the ``connito analyze`` report.

Import from the modules (``connito.analysis.statistics``, ``.summaries``, ``.drivers``, ``.reweighting``,
``.run``); this package file stays light so reading the command's config does not load torch.
"""
