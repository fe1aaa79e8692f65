"""Router observation and router variants (layer 2). Observation is by hooks only: the model is never edited.
Routing modes (Expert Choice, expert-threshold routing) replace an MoE block's forward: :mod:`.routing_modes`."""

from connito.routing.load_balancing import LoadBalancingLoss, needs_observed_loss
from connito.routing.observer import RouterObserver, RoutingRecord, Subscription
from connito.routing.routing_export import load_routing_mode
from connito.routing.routing_modes import RoutingModes, RoutingOptions

__all__ = [
    "LoadBalancingLoss",
    "RouterObserver",
    "RoutingModes",
    "RoutingOptions",
    "RoutingRecord",
    "Subscription",
    "load_routing_mode",
    "needs_observed_loss",
]
