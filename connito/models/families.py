"""The transformers MoE families Connito knows, and what each offers the trainer."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    model_type: str
    """transformers ``config.model_type``."""
    has_aux_loss: bool
    """Whether the family's ``ForCausalLM.forward`` returns the Switch-style load-balancing loss
    (``output_router_logits=True`` -> ``outputs.aux_loss``)."""
    has_shared_experts: bool
    notes: str = ""


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("qwen3_moe", has_aux_loss=True, has_shared_experts=False),
        Family("qwen2_moe", has_aux_loss=True, has_shared_experts=True, notes="one gated shared expert per layer"),
        Family("mixtral", has_aux_loss=True, has_shared_experts=False),
        Family("olmoe", has_aux_loss=True, has_shared_experts=False),
        Family("flex_olmo", has_aux_loss=True, has_shared_experts=False),
        Family(
            "deepseek_v2",
            has_aux_loss=False,
            has_shared_experts=True,
            notes="transformers computes no load-balancing loss for this family",
        ),
        Family(
            "deepseek_v3",
            has_aux_loss=False,
            has_shared_experts=True,
            notes="balances with a routing bias (aux-loss-free); transformers computes no load-balancing loss",
        ),
    )
}


def get_family(model_type: str) -> Family:
    try:
        return FAMILIES[model_type]
    except KeyError:
        known = ", ".join(sorted(FAMILIES))
        raise ModelError(
            f"model family '{model_type}' is not a Mixture-of-Experts family Connito supports. "
            f"Supported families: {known}. Set model.family to one of them, or point model.path at a checkpoint "
            "of one of them."
        ) from None


class ModelError(ValueError):
    """A model configuration or checkpoint Connito cannot use; the message names the fix."""
