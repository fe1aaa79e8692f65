"""Composition (layer 5): put experts trained apart into one model. Pure functions from checkpoints to
checkpoints; experts are reached only through :mod:`connito.experts`, and taken out again (opt-out at inference,
removal by surgery) through :mod:`connito.routing.opt_out`, which retirement shares. The jobs that train the
parts and call these functions are :mod:`connito.orchestration`'s.

- :mod:`connito.composition.btx_merge`: Branch-Train-MiX's merge step (Sukhbaatar et al. 2024): N dense branches of
  one seed become the experts of one MoE checkpoint, everything else averaged.
- :mod:`connito.composition.flexolmo`: FlexOLMo (Shi et al. 2025): a data owner's two-expert start (public FFN
  frozen beside its copy) and the merge of owners into one model, refusing any shared tensor that moved.
- :mod:`connito.composition.expert_groups`: a base MoE's experts partitioned into disjoint per-domain groups, each
  trained apart, merged back from their delta packages with an overlap policy and a held-out validation gate.
- :mod:`connito.composition.dense_to_moe`: what BTX and FlexOLMo share: dense seed -> MoE family, checks, writing.
- :mod:`connito.composition.hidden_means`: mean FFN input per layer (router rows from a domain's text).
- :mod:`connito.composition.fft_moe`: FFT-MoE (Hu et al. 2025): sparse MoE adapters on a frozen base trained by
  federated clients of different budgets, each expert averaged over the clients that trained it.
"""
