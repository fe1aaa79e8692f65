"""Connito: train, inspect, adapt, compose and retire the experts of Mixture-of-Experts language models."""

__version__ = "0.1.0"
