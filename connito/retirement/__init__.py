"""Retirement (layer 5): make a model smaller or simpler once it has served: prune experts a workload does not use,
remove experts (by checkpoint surgery, :mod:`connito.composition.opt_out`), and, next, merge experts and build
shared experts from driver experts.

- :mod:`connito.retirement.pruning`: one-shot pruning from an analysis (ESFT token-selection ratio or gate score,
  pooled over the workload's domains): keep the n most-used experts of every MoE layer, write the checkpoint
  without the others.
"""
