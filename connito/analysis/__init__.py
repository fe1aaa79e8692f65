"""Read-only analysis of what experts do (layer 5): streaming routing statistics and what they imply, driver
experts by causal scan, reweighting, and the ``connito analyze`` report.

``analysis`` is the layer below the other methods: ``adaptation``, ``composition`` and ``retirement`` may import
it (selection, expert groups, pruning and sharing read its scores and held-out losses); it imports none of them, nor
``orchestration`` or ``cli`` (``tests/test_layering.py`` checks it). It reads models, experts, data, routing and
training only.

Import from the modules (``connito.analysis.statistics``, ``.summaries``, ``.drivers``, ``.reweighting``,
``.run``); this package file stays light so reading the command's config does not load torch.
"""
