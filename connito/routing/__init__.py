"""Router observation and router variants (layer 2). Observation is by hooks only: the model is never edited."""

from connito.routing.load_balancing import LoadBalancingLoss, needs_observed_loss
from connito.routing.observer import RouterObserver, RoutingRecord, Subscription

__all__ = ["LoadBalancingLoss", "RouterObserver", "RoutingRecord", "Subscription", "needs_observed_loss"]
