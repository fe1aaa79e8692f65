"""Held-out loss per domain of saved checkpoints: the numbers every comparison of models is made of (adapted vs
base in ``connito adapt``, merged vs seed and branches in ``connito btx``, a group merge's acceptance test).

:func:`held_out_batches` takes evenly spread rows of the validation split (the same rows for every model measured
with it); :func:`checkpoint_losses` loads a checkpoint in plain transformers (float32, CPU unless told) and
measures its mean next-token loss per domain with :func:`connito.analysis.token_loss.domain_losses`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from connito.analysis.token_loss import domain_losses
from connito.data.config import DataConfig


@dataclass(frozen=True)
class HeldOut:
    domains: list[str]
    inputs: list[torch.Tensor]
    """Micro-batches of token ids, [B, S] each."""
    domain_ids: list[torch.Tensor]
    """The domain index of every token, [B, S] each."""

    def losses(self, model: torch.nn.Module) -> dict[str, float]:
        """Mean next-token loss (nats) per domain, and over all tokens as ``all``."""
        tokens_D, loss_D = domain_losses(model, self.inputs, self.domain_ids, len(self.domains))
        out = {domain: float(loss_D[d]) for d, domain in enumerate(self.domains)}
        known = tokens_D > 0
        out["all"] = float((loss_D[known] * tokens_D[known]).sum() / tokens_D[known].sum())
        return out


def held_out_batches(
    data: DataConfig,
    tokenizer_dir: str | Path,
    *,
    domains: list[str] | None = None,
    eval_tokens: int = 65536,
    micro_batch_size: int = 8,
    split: str = "validation",
) -> HeldOut:
    """About ``eval_tokens`` tokens of ``split``, rows spread evenly over it, tokenized with the checkpoint's own
    tokenizer (``tokenizer_dir``); ``domains`` replaces the recipe's domain list when given."""
    from connito.data import prepare_data
    from connito.data.packed import PackedSplit

    data = copy.deepcopy(data)
    if domains and data.source == "recipe":
        data.domains = list(domains)
    data.tokenizer_path = data.tokenizer_path or str(tokenizer_dir)
    prepared = prepare_data(data, progress=False)
    packed = PackedSplit.from_dataset(prepared.load_split(split))
    seq_len = packed.input_ids_NT.shape[1]
    count = min(len(packed), max(1, -(-eval_tokens // seq_len)))
    rows = torch.linspace(0, len(packed) - 1, count).round().long().unique().tolist()
    batches = [rows[i : i + micro_batch_size] for i in range(0, len(rows), micro_batch_size)]
    return HeldOut(
        list(prepared.domains),
        [packed.input_ids_NT[index] for index in batches],
        [packed.domain_ids_NT[index] for index in batches],
    )


def load_checkpoint(path: str | Path, device: str = "cpu") -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32).to(device).eval()


def checkpoint_losses(path: str | Path, held_out: HeldOut) -> dict[str, float]:
    """:meth:`HeldOut.losses` of the checkpoint at ``path``."""
    return held_out.losses(load_checkpoint(path))


def losses_table(rows: dict[str, dict[str, float]], columns: list[str]) -> str:
    """A markdown table: one row per model, one column per domain (nats, 3 decimals)."""
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, losses in rows.items():
        cells = [f"{losses[c]:.3f}" if c in losses else "" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
