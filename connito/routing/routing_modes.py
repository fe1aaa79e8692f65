"""Put a routing mode on every MoE layer of a transformers model: Expert Choice or expert-threshold routing.

::

    routing = RoutingModes(model, RoutingOptions("expert_choice", capacity_factor=1.0))
    loss = lm_loss + routing.predictor_loss()      # Expert Choice: train the causal route's predictor
    model.eval()                                   # now every token routes causally
    routing.remove()                               # the family's own top-k routing again

The modes (:mod:`connito.routing.expert_choice`, :mod:`connito.routing.expert_threshold`) replace each MoE block's
forward through :mod:`connito.routing.routed_moe`. Only plain transformers blocks (``parallel.ep_size=1``): AutoEP's
expert-parallel layers route and dispatch tokens in one fused top-k all-to-all with no seam for a variable number
of tokens per expert chosen across the batch. Options are checked before anything changes, with the fix named.

Shape legend: E routed experts, K experts per token (the family's top-k).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import nn

from connito.experts import ExpertView
from connito.experts.blocks import HFMoEBlock
from connito.routing.edits import routing_rule
from connito.routing.expert_choice import ExpertChoiceMoE
from connito.routing.expert_compute import check_plain_experts
from connito.routing.expert_threshold import ExpertThresholdMoE
from connito.routing.route_predictor import PREDICTOR_INFERENCE
from connito.routing.routed_moe import ATTR, RoutedMoE, install, uninstall

Mode = Literal["expert_choice", "expert_threshold"]
MODES = ("expert_choice", "expert_threshold")


@dataclass(frozen=True)
class RoutingOptions:
    mode: Mode
    capacity_factor: float = 1.0
    """Expert-token products per forward over top-k's: C = round(T * capacity_factor * top_k / E); 1 is the same
    compute as the family's top-k. Must be > 0 and at most E / top_k (C <= T)."""
    predictor_inference: str = "calibrated"
    """Expert Choice only: how the predictor's logits route at inference, ``calibrated``, ``half`` or ``top_k``
    (:mod:`connito.routing.route_predictor`)."""
    decay: float = 0.9
    """Decay of the moving capacity thresholds (expert_threshold's score thresholds, Expert Choice's calibrated
    predictor thresholds), in [0, 1)."""

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"routing mode '{self.mode}' is not one of {', '.join(MODES)}")
        cf = self.capacity_factor
        if isinstance(cf, bool) or not isinstance(cf, int | float) or not math.isfinite(cf) or cf <= 0:
            raise ValueError(
                f"{self.mode}.capacity_factor={cf!r}: give a finite number > 0 (1.0 is top-k's compute: E x C = T x K "
                "expert-token products per forward)"
            )
        if self.predictor_inference not in PREDICTOR_INFERENCE:
            raise ValueError(
                f"{self.mode}.predictor_inference='{self.predictor_inference}' is not one of "
                f"{', '.join(PREDICTOR_INFERENCE)}"
            )
        if isinstance(self.decay, bool) or not isinstance(self.decay, int | float) or not 0 <= self.decay < 1:
            raise ValueError(f"{self.mode}.decay={self.decay!r}: give a number in [0, 1) (0.9 by default)")

    def check_model(self, num_experts: int, top_k: int) -> None:
        if self.capacity_factor * top_k > num_experts:
            raise ValueError(
                f"{self.mode}.capacity_factor={self.capacity_factor} with top_k {top_k} and {num_experts} experts "
                f"asks each expert for more than every token (C = T x {self.capacity_factor * top_k / num_experts:g})"
                f"; give capacity_factor <= {num_experts / top_k:g}"
            )

    def to_dict(self) -> dict:
        return asdict(self)


def _build(block: HFMoEBlock, view: ExpertView, layer: int, options: RoutingOptions) -> RoutedMoE:
    rule = routing_rule(view, layer)
    if options.mode == "expert_choice":
        return ExpertChoiceMoE(block, rule, options.capacity_factor, options.predictor_inference, options.decay)
    return ExpertThresholdMoE(block, rule, options.capacity_factor, options.decay)


class RoutingModes:
    """The routing mode of every MoE layer of ``model``; ``modules`` maps layer -> :class:`RoutedMoE`."""

    def __init__(self, model: nn.Module, options: RoutingOptions, view: ExpertView | None = None):
        self.view = view or ExpertView(model)
        self.options = options
        for layer, block in self.view.blocks():
            if not isinstance(block, HFMoEBlock):
                raise ValueError(
                    f"{options.mode} routing plugs into transformers MoE blocks; layer {layer} is an expert-parallel "
                    f"AutoEP layer. Install it on the transformers model with parallel.ep_size=1"
                )
            check_plain_experts(block)
        options.check_model(self.view.num_experts, self.view.top_k)
        self.modules: dict[int, RoutedMoE] = {}
        for layer, block in self.view.blocks():
            routed = _build(block, self.view, layer, options)
            weight = block.router_weight()
            routed.to(device=weight.device, dtype=weight.dtype)
            routed.train(block.module.training)  # a mode installed on an eval-mode model routes as eval at once
            install(block, routed)
            self.modules[layer] = routed

    def remove(self) -> None:
        """The family's own forward and routing on every block again."""
        for layer in list(self.modules):
            uninstall(self.view.block(layer))
        self.modules.clear()

    def set_eval_route(self, route: str) -> None:
        """Expert Choice: route eval forwards by ``predictor`` (causal, the default) or ``expert_choice`` (the
        leaky training route, for comparison only)."""
        if self.options.mode != "expert_choice" or route not in ("predictor", "expert_choice"):
            raise ValueError(f"eval routes are 'predictor' or 'expert_choice', for expert_choice only; got {route!r}")
        for routed in self.modules.values():
            routed.eval_route = route

    def set_predictor_inference(self, inference: str) -> None:
        if inference not in PREDICTOR_INFERENCE:
            raise ValueError(f"predictor_inference is one of {', '.join(PREDICTOR_INFERENCE)}; got {inference!r}")
        for routed in self.modules.values():
            routed.predictor_inference = inference

    # -- training --------------------------------------------------------------------------------------------------
    def predictor_loss(self) -> torch.Tensor | None:
        """Expert Choice: the mean over MoE layers of the predictors' losses of the training forwards since the last
        call (consumed); None when there were none (or for threshold routing)."""
        losses = [loss for routed in self.modules.values() for loss in getattr(routed, "take_losses", list)()]
        return torch.stack(losses).mean() if losses else None

    def clear_pending(self) -> None:
        self.predictor_loss()

    def thresholds(self) -> list:
        """Every moving threshold (:class:`~connito.routing.capacity_threshold.CapacityThreshold`) of the model."""
        return [
            routed.predictor.calibration if isinstance(routed, ExpertChoiceMoE) else routed.threshold
            for routed in self.modules.values()
        ]

    def sync_(self, world_size: int) -> None:
        """Collective: average the moving thresholds over the data-parallel ranks."""
        for threshold in self.thresholds():
            threshold.sync_(world_size)

    def metrics(self) -> dict[str, float]:
        """``routing/<stat>`` of the last training forward: the worst expert's load over its capacity, experts per
        token, share of tokens no expert took (means over MoE layers; max_load the max), and Expert Choice's
        predictor agreement with the selection."""
        stats = [routed.train_stats for routed in self.modules.values() if routed.train_stats]
        if not stats:
            return {}
        out = {"routing/max_load": max(s["max_load"] for s in stats)}
        for key in sorted({k for s in stats for k in s} - {"max_load"}):
            out[f"routing/{key}"] = sum(s[key] for s in stats) / len(stats)
        return out

    # -- state -----------------------------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """``{"layers.<L>.<name>": tensor}``: every parameter and buffer of the routing modules (CPU copies)."""
        return {
            f"layers.{layer}.{name}": tensor.detach().cpu().contiguous()
            for layer, routed in self.modules.items()
            for name, tensor in routed.state_dict().items()
        }

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        expected = set(self.state_tensors())
        if set(tensors) != expected:
            raise ValueError(
                f"routing state: missing {sorted(expected - set(tensors))[:4]}, unexpected "
                f"{sorted(set(tensors) - expected)[:4]} (written for another model or mode?)"
            )
        for layer, routed in self.modules.items():
            prefix = f"layers.{layer}."
            routed.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})

    def strip(self, state_dict: dict[str, torch.Tensor]) -> list[str]:
        """In place: drop the routing modules' entries from a model ``state_dict`` (what plain transformers would
        not know); returns the keys dropped."""
        dropped = [key for key in state_dict if f".{ATTR}." in key]
        for key in dropped:
            del state_dict[key]
        return dropped
