"""The model families Connito knows: one table, one row per transformers ``model_type``.

Everything Connito needs to know about a family lives in its :class:`Family` row: where its blocks keep routers,
experts and shared experts (:class:`MoELayout`), how its router scores experts, whether transformers computes its
load-balancing loss, and how DeepSpeed AutoEP serves it under expert parallelism. The expert view
(:mod:`connito.experts`), router observation (:mod:`connito.routing`), expert parallelism
(:mod:`connito.parallel`) and the trainer read these rows and nothing else. A user family plugs in with
:func:`register_family`.

What each built-in MoE family keeps where (checked against transformers 5.22.2 ``modeling_<family>.py``). Routers
are ``<Family>TopKRouter`` modules holding a bare ``weight`` [E, H] Parameter and returning ``(logits [T, E],
top-k weights [T, K], top-k ids [T, K])``; experts are ``<Family>Experts`` with fused ``gate_up_proj`` [E, 2I, H]
(gate rows first) and ``down_proj`` [E, H, I].

| model_type  | experts (config)  | router scores                                  | shared experts       | AutoEP  |
|-------------|-------------------|------------------------------------------------|----------------------|---------|
| qwen3_moe   | num_experts       | softmax, top-k, optional renorm                | none                 | preset  |
| qwen2_moe   | num_experts       | softmax, top-k, optional renorm                | shared_expert + gate | preset  |
| mixtral     | num_local_experts | softmax, top-k, always renorm                  | none                 | preset  |
| olmoe       | num_experts       | softmax, top-k, optional renorm                | none                 | pattern |
| flex_olmo   | num_experts       | softmax, top-k, optional renorm                | none                 | pattern |
| deepseek_v2 | n_routed_experts  | softmax, greedy or group-limited top-k, scaled | shared_experts (MLP) | preset  |
| deepseek_v3 | n_routed_experts  | sigmoid + choice bias, group top-k, scaled     | shared_experts (MLP) | preset  |
| llama, qwen3, qwen2 | dense: no experts (the seeds and branches of branch-train-mix)              | -       |

Dense layers among MoE layers (Qwen ``mlp_only_layers`` / ``decoder_sparse_step``, DeepSeek
``first_k_dense_replace``) are found by looking at the modules, not by re-deriving each family's rule.
"""

from __future__ import annotations

from dataclasses import dataclass

from connito.common.errors import UserError


class ModelError(UserError, ValueError):
    """A model configuration or checkpoint Connito cannot use; the message names the fix."""


@dataclass(frozen=True)
class MoELayout:
    """The attribute names one family's transformers modules use; every field has the value most families use."""

    num_experts_key: str = "num_experts"
    """Config attribute holding the global number of routed experts per MoE layer."""
    top_k_key: str = "num_experts_per_tok"
    block_attr: str = "mlp"
    """Attribute of a decoder layer holding its MoE block (or its dense MLP)."""
    router_attr: str = "gate"
    experts_attr: str = "experts"
    shared_experts_attr: str | None = None
    shared_expert_gate_attr: str | None = None
    router_bias_attr: str | None = None
    """A per-expert bias added to the scores for choosing (not weighting) experts: DeepSeek-V3's
    ``e_score_correction_bias`` buffer."""


@dataclass(frozen=True)
class AutoEPSupport:
    """How DeepSpeed AutoEP serves a family under ``parallel.ep_size > 1``: a preset, or its custom layer pattern."""

    preset: str | None = None
    pattern: dict | None = None
    """AutoEP custom-pattern keys (``moe_layer_pattern`` ...) for a family with no preset. AutoEP's default preset
    adapter then does not retarget transformers' router-logit recorder, so Connito computes the load-balancing
    loss from router observation (:mod:`connito.routing.load_balancing`)."""

    def section(self, ep_size: int) -> dict:
        """The DeepSpeed config's ``"expert_parallel"`` section."""
        if self.preset is not None:
            return {"enabled": True, "autoep_size": ep_size, "preset_model": self.preset}
        return {"enabled": True, "autoep_size": ep_size, **(self.pattern or {})}


@dataclass(frozen=True)
class Family:
    model_type: str
    """transformers ``config.model_type``."""
    layout: MoELayout | None = None
    """Where the MoE block keeps its parts; None for a dense family."""
    router_scoring: str = "softmax"
    """How the router turns logits into expert scores: ``softmax`` or ``sigmoid`` (DeepSeek-V3)."""
    load_balancing_loss: str | None = None
    """``module:function`` of transformers' own load-balancing loss for this family (the Switch-style loss its
    ``ForCausalLM.forward`` returns as ``outputs.aux_loss`` when ``output_router_logits=True``); None when
    transformers computes none."""
    autoep: AutoEPSupport | None = None
    """None: DeepSpeed AutoEP cannot run this family (``parallel.ep_size`` must stay 1)."""
    notes: str = ""

    @property
    def is_moe(self) -> bool:
        return self.layout is not None

    @property
    def has_aux_loss(self) -> bool:
        return self.load_balancing_loss is not None

    @property
    def has_shared_experts(self) -> bool:
        return self.layout is not None and self.layout.shared_experts_attr is not None


# OLMoE / FlexOlmo blocks for AutoEP's custom pattern: ``mlp.gate`` is a router holding ``weight`` [E, H] (softmax
# over all experts, top-k, renormalised only if ``norm_topk_prob``: AutoEP's default adapter reads ``route_norm``
# from that config key), ``mlp.experts`` holds fused ``gate_up_proj`` [E, 2I, H] (gate rows first) and
# ``down_proj`` [E, H, I], SwiGLU (``hidden_act="silu"``), the routing weight applied to the expert output.
OLMOE_PATTERN = {
    "moe_layer_pattern": r"model\.layers\.\d+\.mlp",
    "router_pattern": "gate",
    "expert_pattern": "experts",
    "expert_w1": "gate_up_proj",
    "expert_w2": "down_proj",
    "expert_w3": None,
    "num_experts_attr": "num_experts",
    "top_k_attr": "num_experts_per_tok",
    "score_func": "softmax",
    "score_apply": "post",
    "expert_activation": "swiglu",
}


def _lb(family: str) -> str:
    return f"transformers.models.{family}.modeling_{family}:load_balancing_loss_func"


_FAMILIES: dict[str, Family] = {}


def register_family(family: Family, *, replace: bool = False) -> Family:
    """Make Connito know ``family`` (by its ``model_type``); refuses to replace a known one silently."""
    if family.model_type in _FAMILIES and not replace:
        raise ValueError(f"model family '{family.model_type}' is already registered; pass replace=True to override it")
    _FAMILIES[family.model_type] = family
    return family


def known_families() -> list[str]:
    return sorted(_FAMILIES)


def moe_families() -> list[str]:
    return sorted(k for k, f in _FAMILIES.items() if f.is_moe)


def get_family(model_type: str) -> Family:
    try:
        return _FAMILIES[model_type]
    except KeyError:
        raise ModelError(
            f"model family '{model_type}' is not one Connito knows. Known families: "
            f"{', '.join(known_families())}. Set model.family to one of them, point model.path at a checkpoint of "
            "one of them, or register yours with connito.models.register_family."
        ) from None


for _family in (
    Family("qwen3_moe", MoELayout(), load_balancing_loss=_lb("qwen3_moe"), autoep=AutoEPSupport("qwen3_moe")),
    # AutoEP's qwen3_moe preset lists qwen2_moe among its hf_model_types and carries the gated shared expert.
    Family(
        "qwen2_moe",
        MoELayout(shared_experts_attr="shared_expert", shared_expert_gate_attr="shared_expert_gate"),
        load_balancing_loss=_lb("qwen2_moe"),
        autoep=AutoEPSupport("qwen3_moe"),
        notes="one gated shared expert per layer",
    ),
    Family(
        "mixtral",
        MoELayout(num_experts_key="num_local_experts"),
        load_balancing_loss=_lb("mixtral"),
        autoep=AutoEPSupport("mixtral"),
    ),
    Family("olmoe", MoELayout(), load_balancing_loss=_lb("olmoe"), autoep=AutoEPSupport(pattern=OLMOE_PATTERN)),
    Family("flex_olmo", MoELayout(), load_balancing_loss=_lb("flex_olmo"), autoep=AutoEPSupport(pattern=OLMOE_PATTERN)),
    Family(
        "deepseek_v2",
        MoELayout(num_experts_key="n_routed_experts", shared_experts_attr="shared_experts"),
        autoep=AutoEPSupport("deepseek_v2"),
        notes="transformers computes no load-balancing loss for this family",
    ),
    Family(
        "deepseek_v3",
        MoELayout(
            num_experts_key="n_routed_experts",
            shared_experts_attr="shared_experts",
            router_bias_attr="e_score_correction_bias",
        ),
        router_scoring="sigmoid",
        autoep=AutoEPSupport("deepseek_v3"),
        notes="balances with a routing bias (aux-loss-free); transformers computes no load-balancing loss",
    ),
    # BAM (connito.models.custom.modeling_connito_bam): the base family's model with soft-routed attention experts.
    # Its FFN MoE block is the base family's own, so the expert view, router observation and the load-balancing loss
    # are the base's. No AutoEP: DeepSpeed's presets match the base family's model_type only.
    *(
        Family(
            f"connito_bam_{base}",
            layout,
            load_balancing_loss=_lb(base),
            notes=f"BAM on {base} (Connito's modeling code): DeepSpeed AutoEP's presets and layer swap know "
            "transformers' own model types and attention only, so there is no expert parallelism for it",
        )
        for base, layout in (
            ("qwen3_moe", MoELayout()),
            ("mixtral", MoELayout(num_experts_key="num_local_experts")),
            ("qwen2_moe", MoELayout(shared_experts_attr="shared_expert", shared_expert_gate_attr="shared_expert_gate")),
        )
    ),
    Family("connito_bts", notes="BTS (Connito's modeling code): frozen hub and branches, stitches; no routed experts"),
    Family("connito_fft_moe", notes="FFT-MoE (Connito's modeling code): a frozen base with sparse MoE adapters"),
    Family("llama", notes="dense: no experts"),
    Family("qwen3", notes="dense: no experts"),
    Family("qwen2", notes="dense: no experts"),
):
    register_family(_family)
