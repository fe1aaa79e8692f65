"""Read-only analysis of what experts do (layer 5): streaming routing statistics and what they imply."""

from connito.analysis.statistics import COUNTS, SIGMOID_SCORED, RoutingStatistics, router_scores

__all__ = ["COUNTS", "SIGMOID_SCORED", "RoutingStatistics", "router_scores"]
