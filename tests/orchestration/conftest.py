"""Fixtures of the orchestration tests."""

from tests.orchestration.slurm_cluster import slurm_cluster  # noqa: F401  (the SLURM fixture)
