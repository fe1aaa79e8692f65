"""``callbacks.fft_moe``: one FFT-MoE client's local training on the one trainer::

    connito train model.path=base model.aux_loss_coef=0 +callbacks.fft_moe.top_k=2 \
        +callbacks.fft_moe.num_experts=8 +callbacks.fft_moe.width=16 +callbacks.fft_moe.init=round_1/global.safetensors

* ``on_model_built``: the sparse MoE adapters go beside every chosen FFN (:mod:`.adapters`), ``init`` (the server's
  adapters of the previous round, a safetensors file by model names) is copied into them, and every base parameter
  is frozen (no gradient, no optimizer state: bit-identical);
* ``on_engine_built``: the budget-normalised balance term ``train/adapter_balance_loss`` (:mod:`.balance`), weight
  ``aux_loss_coef``, and the per-expert token counter;
* ``on_export`` / ``on_exported``: the adapters leave the HF export (the base's checkpoint stays plain transformers)
  and are written beside it as ``hf/fft_moe_adapters.safetensors`` with ``hf/fft_moe_adapters.json`` (the spec, the
  budget and the tokens each expert was routed: the experts a client trained are those with tokens); with ``update``
  (and ``client``) also the client's update for the server: a delta package of the adapters against ``model.path``
  plus ``update.json`` (:func:`connito.composition.fft_moe.server.write_update`).

Refused with the fix: ``parallel.ep_size > 1`` (AutoEP replaces the MoE blocks the adapters hook), ``callbacks.
trainable`` in the same run (the adapters decide what trains), and ``model.aux_loss_coef > 0`` on an MoE base (its
routers are frozen; the family's balance loss would only push the adapters to rebalance the base's routing).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from connito.common.atomic import atomic_write_text
from connito.composition.fft_moe.adapters import (
    AdapterSpec,
    adapter_state,
    freeze_base,
    install_adapters,
    is_adapter_name,
    load_adapter_state,
)
from connito.composition.fft_moe.balance import AdapterRouting, budget_balance_loss
from connito.training.callbacks import Callback, CallbackError, LossTerm, MicroBatch

if TYPE_CHECKING:
    from connito.training.trainer import Trainer

log = logging.getLogger("connito.composition")

ADAPTERS_FILE = "fft_moe_adapters.safetensors"
ADAPTERS_RECORD = "fft_moe_adapters.json"


class AdapterBalanceTerm(LossTerm):
    name = "adapter_balance_loss"

    def __init__(self, coef: float, routing: AdapterRouting):
        self.coef, self.routing = coef, routing

    def __call__(self, batch: MicroBatch, outputs) -> torch.Tensor | None:
        if not self.routing.logits:
            return None
        losses = [
            budget_balance_loss(logits_TM, self.routing.adapters[layer].top_k)
            for layer, logits_TM in sorted(self.routing.logits.items())
        ]
        return torch.stack(losses).mean()


class FftMoe(Callback):
    """Options: ``top_k`` (the client's budget), ``num_experts``, ``width``, ``activation``, ``layers``,
    ``aux_loss_coef``, ``init``; ``client`` and ``update`` (a folder): write the client's update for the server
    there (:func:`connito.composition.fft_moe.server.write_update`; |D_n| is the run's training rows)."""

    def __init__(
        self,
        top_k: int,
        num_experts: int = 8,
        width: int = 16,
        activation: str = "gelu",
        layers: list[int] | None = None,
        aux_loss_coef: float = 0.01,
        init: str | None = None,
        client: str = "",
        update: str | None = None,
    ):
        self.spec = AdapterSpec(num_experts, width, activation, None if layers is None else tuple(layers))
        self.spec.check_budget(top_k)
        if aux_loss_coef < 0:
            raise CallbackError(f"callbacks.fft_moe.aux_loss_coef={aux_loss_coef} must be >= 0 (0: no balance term)")
        if init is not None and not Path(init).expanduser().is_file():
            raise CallbackError(f"callbacks.fft_moe.init='{init}' is not a file (a safetensors file of adapters)")
        if update is not None and not client:
            raise CallbackError("callbacks.fft_moe.update writes a client's update: name the client, client=<name>")
        self.top_k, self.aux_loss_coef, self.init = int(top_k), float(aux_loss_coef), init
        self.client, self.update = client, update
        self.adapters = {}
        self.routing: AdapterRouting | None = None
        self._exported: dict[str, torch.Tensor] = {}

    def on_model_built(self, trainer: Trainer, model: torch.nn.Module) -> None:
        cfg = trainer.cfg
        if cfg.parallel.ep_size > 1:
            raise CallbackError(
                f"callbacks.fft_moe with parallel.ep_size={cfg.parallel.ep_size}: AutoEP replaces the MoE blocks the "
                "adapters join; train FFT-MoE clients at parallel.ep_size=1"
            )
        if "trainable" in cfg.callbacks:
            raise CallbackError(
                "callbacks.fft_moe and callbacks.trainable cannot run together: FFT-MoE trains its adapters only and "
                "freezes the whole base; drop callbacks.trainable"
            )
        if trainer.family.is_moe and cfg.model.aux_loss_coef > 0:
            raise CallbackError(
                f"callbacks.fft_moe: model.aux_loss_coef={cfg.model.aux_loss_coef} balances the base's routers, which "
                "FFT-MoE freezes; set model.aux_loss_coef=0 (callbacks.fft_moe.aux_loss_coef balances the adapters)"
            )
        self.adapters = install_adapters(model, self.spec, self.top_k)
        if self.init is not None:
            load_adapter_state(model, load_file(str(Path(self.init).expanduser())))
        trainable, total = freeze_base(model)
        if trainer.info.is_main:
            log.info(
                "fft_moe: adapters on layers %s (M=%d, r=%d, budget %d); %d of %d parameters trainable (%.2f%%)%s",
                sorted(self.adapters), self.spec.num_experts, self.spec.width, self.top_k, trainable, total,
                100 * trainable / total, f"; started from {self.init}" if self.init else "",
            )  # fmt: skip

    def on_engine_built(self, trainer: Trainer) -> None:
        self.routing = AdapterRouting(trainer.engine.module, self.adapters)
        if self.aux_loss_coef > 0:
            trainer.add_loss_term(AdapterBalanceTerm(self.aux_loss_coef, self.routing))

    def on_export(self, trainer: Trainer, state_dict: dict[str, torch.Tensor]) -> None:
        self._exported = {name: state_dict.pop(name) for name in [n for n in state_dict if is_adapter_name(n)]}

    def on_exported(self, trainer: Trainer, export_dir) -> None:
        if not trainer.info.is_main:
            return
        export_dir = Path(export_dir)
        tensors = self._exported or adapter_state(trainer.engine.module)
        save_file({n: t.detach().cpu().contiguous() for n, t in tensors.items()}, str(export_dir / ADAPTERS_FILE))
        atomic_write_text(export_dir / ADAPTERS_RECORD, json.dumps(self.record(), indent=1))
        if self.update is not None:
            if not trainer.cfg.model.path:
                raise CallbackError(
                    "callbacks.fft_moe.update: an update is a delta of the base checkpoint the client trained from; "
                    "train from one (model.path=<base>)"
                )
            from connito.composition.fft_moe.server import write_update

            out = write_update(tensors, trainer.cfg.model.path, self.update, client=self.client,
                               num_examples=len(trainer.train_split), record=self.record(), overwrite=True)  # fmt: skip
            log.info("fft_moe: client %s's update written to %s", self.client, out)

    def record(self) -> dict:
        """The spec, the budget and the tokens each adapter expert was routed in this run (rows: adapter layers)."""
        tokens = self.routing.tokens_LM if self.routing is not None else torch.zeros(0)
        return {
            "num_experts": self.spec.num_experts,
            "width": self.spec.width,
            "activation": self.spec.activation,
            "layers": sorted(self.adapters),
            "top_k": self.top_k,
            "tokens_per_expert": tokens.to(torch.int64).tolist(),
        }

    def state_dict(self) -> dict:
        return {"tokens_LM": self.routing.tokens_LM.clone()} if self.routing is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if "tokens_LM" in state and self.routing is not None:
            self.routing.tokens_LM.copy_(state["tokens_LM"])
