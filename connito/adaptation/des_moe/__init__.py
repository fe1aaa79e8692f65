"""DES-MoE (Li et al., EMNLP 2025, "Dynamic Expert Specialization"): multi-domain adaptation of an MoE model that
forgets less, as one callback of the one trainer::

    connito train plugins='[connito.adaptation.des_moe]' model.path=runs/quickstart/hf +callbacks.des_moe={}
    connito train ... +callbacks.des_moe.tau=0.5 '+callbacks.des_moe.domains=[code,docs]'

(``connito train`` imports this package itself, so ``plugins=`` is needed only where the trainer is called from
Python: ``run_training(cfg, ...)`` with ``cfg.plugins=['connito.adaptation.des_moe']``.) The parts, one module each:

* :mod:`.router`: the Adaptive Lightweight Router, the pretrained linear router plus an MLP residual whose output
  layer starts at zero (the paper's "copy the pretrained router into W2" cannot reproduce the pretrained logits;
  this does, bit for bit);
* :mod:`.distill`: ``lambda * KL(softmax(R_pre / t) || softmax(R_adapt / t)) + (1 - lambda) * L_task``, t = 0.7,
  lambda = max(0, 1 - progress) or any schedule by config;
* :mod:`.domain_map`: the expert-domain map from top-k frequencies per domain (phi = 0.6 of the domain's maximum),
  built after a warm-up and refreshed every T steps by an EMA (0.9 new, 0.1 old);
* :mod:`.token_masks`: per-token gradient masks, so each expert learns only from tokens of domains it serves and
  mixed-domain packed rows need no single-domain batches;
* :mod:`.phases`: the three phases (I router + backbone, II router + domains' experts, III domains' experts; at 0.2
  and 0.7 of the run) as trainable sets of the slice-exact gradient mask (:mod:`connito.training.grad_masks`);
* :mod:`.export`: the HF export folds the adaptive router into the family's linear router (exact while its MLP output
  is zero, least squares otherwise, with the top-k agreement reported) and ships the exact router beside it;
* :mod:`.callback`: the ``des_moe`` callback that wires them to the trainer; :mod:`.config`: its options.

Not implemented: the paper's duplication of experts that serve several domains into per-domain copies. The map
that decides which experts to copy exists only after the warm-up of the run being trained, while the expert count
is fixed when the engine is built (the optimizer state, DeepSpeed's ZeRO partitions and AutoEP's expert placement
all hold E experts per layer), so copying mid-run would need a new engine: a restart, not a callback. It also makes
the export's expert count grow, and routing a token to "its domain's" copy needs a domain label that inference does
not have. With per-token masks an expert serving two domains still learns from both; a run that wants copies can
take the written map (``<run>/des_moe_map.json``), duplicate experts and router rows on the checkpoint
(:meth:`connito.experts.ExpertView.add_router_rows` plus the expert tensors), and train again.
"""

from connito.adaptation.des_moe.callback import DesMoe
from connito.adaptation.des_moe.config import DesMoeConfig

__all__ = ["DesMoe", "DesMoeConfig"]
