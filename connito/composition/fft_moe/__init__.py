"""FFT-MoE (Hu et al. 2025, arXiv 2508.18663): federated fine-tuning of a frozen model with sparse MoE adapters.

- :mod:`.adapters`: M bottleneck experts and a top-k router beside each chosen FFN, zero at round 0.
- :mod:`.balance`: the budget-normalised balance loss of the adapter routers and their per-expert token counts.
- :mod:`.callback`: ``callbacks.fft_moe``, one client's local training on the one trainer.
- :mod:`.server`: a client's update as a verified delta package, what the server accepts, per-expert aggregation.
"""

from connito.composition.fft_moe.adapters import (
    AdapterError,
    AdapterSpec,
    SparseMoEAdapter,
    adapter_state,
    freeze_base,
    install_adapters,
    load_adapter_state,
)
from connito.composition.fft_moe.balance import budget_balance_loss

__all__ = [
    "AdapterError",
    "AdapterSpec",
    "SparseMoEAdapter",
    "adapter_state",
    "budget_balance_loss",
    "freeze_base",
    "install_adapters",
    "load_adapter_state",
]
