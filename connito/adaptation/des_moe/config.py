"""Options of DES-MoE (``callbacks.des_moe``), one typed dataclass checked when it is built.

``connito train +callbacks.des_moe.tau=0.5 '+callbacks.des_moe.phase_ends=[0.3,0.8]'`` passes the keys as keyword
arguments; an unknown key or a value out of range stops the run before any work, naming the fix. Values the paper
marks "e.g." are the defaults here; ``refresh_every`` (the paper gives no T) and ``warmup`` are Connito's choices.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from connito.training.callbacks import CallbackError

PARTS = ("router", "backbone", "experts", "embeddings", "attention", "norms", "mlp")
"""What a phase can train. ``router``: every MoE layer's router (its pretrained linear weight and the adaptive MLP);
``experts``: the routed experts that some active domain's row of the expert-domain map allows (every routed expert
before the first map exists); ``backbone``: every parameter that is neither a routed expert nor a router, the union
of ``embeddings`` (input embedding and LM head), ``attention`` (each layer's attention module, q/k norms included),
``norms`` (the layers' and the final norm weights) and ``mlp`` (dense layers' MLPs, shared experts and their gates):
:func:`connito.adaptation.des_moe.phases.backbone_parts`."""

DEFAULT_PHASE_PARTS = [["router", "backbone"], ["router", "experts"], ["experts"]]


@dataclass
class DesMoeConfig:
    """DES-MoE (Li et al., EMNLP 2025). Every fraction is of ``train.steps``."""

    tau: float = 0.7
    """Distillation temperature t of ``KL(softmax(R_pre / t) || softmax(R_adapt / t))``."""
    kd_schedule: str = "linear"
    """lambda(progress) in ``lambda * L_KD + (1 - lambda) * L_task``, progress = step / train.steps:
    ``linear`` (``max(0, 1 - progress)``, the paper's), ``cosine`` (``(1 + cos(pi * progress)) / 2``),
    ``piecewise`` (linear between ``kd_knots``) or a name registered with
    :func:`connito.adaptation.des_moe.distill.register_kd_schedule`."""
    kd_knots: list = field(default_factory=list)
    """``kd_schedule=piecewise``: ``[[progress, lambda], ...]`` with increasing progress, e.g. ``[[0,1],[0.5,0]]``
    (flat beyond the first and last knot; ``[[0,0.3],[1,0.3]]`` is a constant 0.3)."""
    router_hidden_mult: int = 4
    """The adaptive router's MLP is ``hidden_size -> router_hidden_mult * hidden_size -> experts`` (paper: 4d)."""
    phi: float = 0.6
    """Expert e serves domain d in a layer when its top-k frequency on d's tokens is at least phi times the
    largest frequency of that layer on d's tokens."""
    ema_new: float = 0.9
    """At each refresh: frequency = ema_new * (this window's) + (1 - ema_new) * (the previous estimate)."""
    warmup: float = 0.2
    """Fraction of the run that counts routing before the first expert-domain map (by default phase I, when the
    experts are frozen and the map is not used)."""
    refresh_every: int = 100
    """T: after the warm-up the map is refreshed every T optimizer steps (0: never; the warm-up map stays)."""
    lock_map_in_last_phase: bool = True
    """The paper locks the expert-domain map in phase III: it is refreshed one last time when the last phase starts
    and never after, so the experts the last phase trains stay the same. False: refresh through the whole run."""
    phase_ends: list = field(default_factory=lambda: [0.2, 0.7])
    """Where each phase but the last ends; phase i spans ``[round(end_{i-1} * steps), round(end_i * steps))``."""
    phase_parts: list = field(default_factory=lambda: [list(p) for p in DEFAULT_PHASE_PARTS])
    """What each phase trains, from :data:`PARTS`: one list per phase (``len(phase_ends) + 1`` of them). The
    default follows the paper's equations: I router + backbone (all of it: embeddings, attention, norms, dense and
    shared MLPs; the routed experts frozen), II router + the domains' experts, III the domains' experts only. The
    paper's figure caption trains router + experts in phase I instead (``[[router, experts], ...]``); a run that must
    keep general text intact can leave the backbone out (``[[router], ...]``) or name parts of it
    (``[[router, attention, norms], ...]``)."""
    domains: list = field(default_factory=list)
    """The active domains (names of the data's domains); empty: all of them. Tokens of another domain update no
    routed expert (their gradient still reaches the router and the backbone)."""
    token_masks: bool = True
    """Per-token gradient masks: an expert's gradient sums only over the tokens routed to it whose domain the map
    allows for it. False: every routed token counts (only the trainable set follows the map)."""
    calibration_rows: int = 32
    """HF export: validation rows whose hidden states fit the linear router the adaptive router is folded into."""
    seed: int = 0
    """Seed of the adaptive routers' first MLP layer (the same on every rank)."""

    def __post_init__(self) -> None:
        if not self.tau > 0:
            raise CallbackError(f"callbacks.des_moe.tau={self.tau} must be > 0 (the paper uses 0.7)")
        if not 0 < self.phi <= 1:
            raise CallbackError(f"callbacks.des_moe.phi={self.phi} must be in (0, 1] (the paper uses 0.6)")
        if not 0 <= self.ema_new <= 1:
            raise CallbackError(f"callbacks.des_moe.ema_new={self.ema_new} must be in [0, 1] (the paper uses 0.9)")
        if not 0 < self.warmup < 1:
            raise CallbackError(f"callbacks.des_moe.warmup={self.warmup} must be a fraction of the run in (0, 1)")
        if self.refresh_every < 0:
            raise CallbackError(f"callbacks.des_moe.refresh_every={self.refresh_every} must be >= 0 (0: never)")
        if self.router_hidden_mult < 1:
            raise CallbackError(f"callbacks.des_moe.router_hidden_mult={self.router_hidden_mult} must be >= 1")
        if self.calibration_rows < 1:
            raise CallbackError(f"callbacks.des_moe.calibration_rows={self.calibration_rows} must be >= 1")
        ends = [float(e) for e in self.phase_ends]
        if any(not 0 < e < 1 for e in ends) or ends != sorted(set(ends)):
            raise CallbackError(
                f"callbacks.des_moe.phase_ends={self.phase_ends} must be increasing fractions in (0, 1), "
                "e.g. [0.2, 0.7]"
            )
        self.phase_ends = ends
        parts = [[str(p) for p in ([phase] if isinstance(phase, str) else phase)] for phase in self.phase_parts]
        if len(parts) != len(ends) + 1:
            raise CallbackError(
                f"callbacks.des_moe.phase_parts has {len(parts)} phases but phase_ends={ends} makes {len(ends) + 1}: "
                f"give one list per phase, e.g. {DEFAULT_PHASE_PARTS}"
            )
        unknown = sorted({p for phase in parts for p in phase} - set(PARTS))
        if unknown or any(not phase for phase in parts):
            raise CallbackError(
                f"callbacks.des_moe.phase_parts={self.phase_parts}: every phase names at least one of {list(PARTS)}"
                + (f" (unknown: {unknown})" if unknown else "")
            )
        self.phase_parts = parts
        self.domains = [str(d) for d in self.domains]
