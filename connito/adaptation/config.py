"""Typed configs of ``connito select`` (``configs/select.yaml``) and ``connito adapt`` (``configs/adapt.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from connito.training.config import ConnitoConfig


@dataclass
class SelectConfig:
    """Root config of ``connito select``: which analysis, which rule, which domains, where the mask file goes.
    The rules are in :mod:`connito.adaptation.selection`."""

    analysis_path: str = ""
    """An ``analysis.json`` written by ``connito analyze``, or the directory holding it. Empty: what ``connito
    quickstart`` or ``connito train`` wrote last, ``runs/lifecycle/analysis`` or ``runs/quickstart/analysis``
    (:mod:`connito.models.default_paths`). (Not ``analysis=``: that name is the ``analysis`` config group of
    ``connito train``, and Hydra reads ``analysis=...`` as a group choice in every command.)"""
    method: str = "gate"
    """``gate`` (ESFT average gate score), ``token`` (ESFT token-selection ratio), ``driver`` (causal driver score)
    or ``list`` (the hand-written ``experts``)."""
    domains: list[str] = field(default_factory=lambda: ["code"])
    """The domain(s) to select for, e.g. ``domains=[code]`` or ``domains=[code,docs]``. Default: ``code``, the domain
    ``connito adapt`` adapts to by default."""
    combine: str = "pool"
    """Several domains: ``pool`` (token-weighted mean score, one selection) or ``union`` (one selection each)."""
    top_p: float = 0.2
    """Per layer, keep the fewest experts whose share of the layer's score reaches top_p, in (0, 1] (ESFT: 0.2)."""
    top_n: int | None = None
    """Instead of top_p: keep the n best-scored experts of each layer."""
    experts: list[str] = field(default_factory=list)
    """method=list: the experts to keep as ``layer:expert``, e.g. ``experts=[1:0,1:5,2:3]``."""
    out: str = ""
    """The mask file to write. Empty: ``mask-<method>-<domains>-p<top_p>.json`` beside the analysis.json."""


METHODS = ("full", "esft", "des_moe")


@dataclass
class EsftConfig:
    """``connito adapt method=esft``: train the experts the domain uses (ESFT, Wang et al. 2024) and nothing else,
    with slice-exact gradient masks (:mod:`connito.training.grad_masks`)."""

    mask_file: str = ""
    """The ``connito.mask/1`` file of the experts to train (``connito select``). Empty: analyse the training
    data on the base model first, select with ``score`` and ``top_p``, and write ``<run>/mask.json``."""
    score: str = "gate"
    """Without a mask file: ``gate`` (ESFT-Gate: average gate score) or ``token`` (ESFT-Token: token
    selection ratio)."""
    top_p: float = 0.2
    """Without a mask file: per layer, the fewest experts whose share of the score reaches top_p (ESFT: 0.2)."""
    analysis_tokens: int = 65536
    """Without a mask file: training tokens the selection's analysis streams."""
    shared_experts: bool = False
    """Train the shared experts too (default: the selected routed experts alone)."""
    routers: bool = False
    """Train the routers too."""
    modules: list[str] = field(default_factory=list)
    """More parameters to train, by name glob (e.g. ``[lm_head.weight]``)."""


@dataclass
class AdaptOutcomeConfig:
    """What ``connito adapt`` measures after training (``<run>/adapt.json``, the table of ``connito adapt
    report``)."""

    eval_domains: list[str] = field(default_factory=list)
    """Domains whose validation loss is compared between base and adapted model (the adapted domains' gain, the
    others' forgetting). Empty: every default recipe domain (code, docs, prose, wiki)."""
    adapted_domains: list[str] = field(default_factory=list)
    """The domains the run adapts to: the gain is their mean loss drop, the other measured domains' mean change is the
    forgetting. Empty: the training data's domains (``data.domains``; for ``data.source=files`` the files')."""
    eval_tokens: int = 65536
    """Validation tokens per comparison (rows spread evenly over the split)."""
    save_delta: bool = True
    """Write ``<run>/delta``: an expert delta package of everything the run changed (``connito apply`` turns base +
    delta back into the full checkpoint)."""


@dataclass
class AdaptConfig(ConnitoConfig):
    """Root config of ``connito adapt``: the trainer's config (``model.path`` is the base checkpoint, ``data`` the
    domain(s) to adapt to) plus the method and what to measure after."""

    method: str = "esft"
    """``full`` (every parameter), ``esft`` (the selected experts only; options under ``esft``) or ``des_moe``
    (DES-MoE, Li et al. 2025: the ``des_moe`` callback, options as ``+callbacks.des_moe.<option>=...``)."""
    esft: EsftConfig = field(default_factory=EsftConfig)
    outcome: AdaptOutcomeConfig = field(default_factory=AdaptOutcomeConfig)
