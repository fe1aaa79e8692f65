"""Retirement (layer 5): make a model smaller or simpler once it has served: prune experts a workload does not use
(one-shot, or progressively while fine-tuning), merge experts that do the same job, and move the experts a
workload depends on into an always-on shared expert. Removal itself (opt-out at inference, surgery on the
checkpoint) is :mod:`connito.routing.opt_out`, shared with composition.

- :mod:`connito.retirement.pruning`: one-shot pruning from an analysis (ESFT token-selection ratio or gate score,
  pooled over the workload's domains) or by REAP saliency: keep the n highest-scoring experts of every MoE layer,
  write the checkpoint without the others.
- :mod:`connito.retirement.saliency`: REAP saliency (mean gate weight x expert output norm over the tokens routed
  to each expert), measured on calibration batches.
- :mod:`connito.retirement.merging`: merge groups of similar experts (co-activation or weight similarity) into one,
  usage-weighted, router rows combined, the other members removed by surgery.
- :mod:`connito.retirement.progressive`: progressive task-specific pruning during fine-tuning (the
  ``progressive_prune`` callback; its additive mask is :mod:`connito.retirement.progressive_mask`).
- :mod:`connito.retirement.sharing`: shared experts from driver (or most-used) experts, distilled against the
  original layer.
"""
