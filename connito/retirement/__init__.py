"""Retirement (layer 5): make a model smaller or simpler once it has served: prune experts a workload does not use,
remove experts (by checkpoint surgery, :mod:`connito.composition.opt_out`), and, next, merge experts and build
shared experts from driver experts.

- :mod:`connito.retirement.pruning`: one-shot pruning from an analysis (ESFT token-selection ratio or gate score,
  pooled over the workload's domains) or by REAP saliency: keep the n highest-scoring experts of every MoE layer,
  write the checkpoint without the others.
- :mod:`connito.retirement.saliency`: REAP saliency (mean gate weight x expert output norm over the tokens routed
  to each expert), measured on calibration batches.
- :mod:`connito.retirement.merging`: merge groups of similar experts (co-activation or weight similarity) into one,
  usage-weighted, router rows combined, the other members removed by surgery.
"""
