"""The one mapping between DeepSpeed AutoEP's expert-parallel layers and the transformers blocks they replace.

What AutoEP (deepspeed 0.19.8) holds in an ``AutoEPMoELayer`` at the path of the transformers MoE block, against
what the family's transformers block holds there (``layout`` is the family's :class:`connito.models.MoELayout`):

| AutoEP (relative to the block)          | transformers                                   |
|-----------------------------------------|------------------------------------------------|
| ``experts.w1`` [E/N, I, H] (gate)       | ``<experts>.gate_up_proj`` [E, 2I, H], rows ``:I``  |
| ``experts.w3`` [E/N, I, H] (up)         | ``<experts>.gate_up_proj`` [E, 2I, H], rows ``I:``  |
| ``experts.w2`` [E/N, H, I] (down)       | ``<experts>.down_proj`` [E, H, I]              |
| ``router.gate.*`` (an ``nn.Linear``)    | ``<router>.*`` (``weight`` [E, H])             |
| ``gate.gate.*`` (AutoEP's alias of the router under the family's name) | ``<router>.*``  |
| ``router.e_score_correction_bias``      | ``<router>.e_score_correction_bias`` [E]       |
| ``shared_experts.*`` / ``shared_experts_gate.*`` | ``<shared_experts>.*`` / ``<shared_expert_gate>.*`` |

A rank of an expert-parallel group of N holds the contiguous global experts ``[r * E/N, (r + 1) * E/N)``.
Export (:func:`connito.parallel.gather_hf_state_dict`) and checkpoint re-layouts (:mod:`connito.training.relayout`,
:mod:`connito.training.relayout_zero0`) use these functions and nothing else to move between the two namings.

Shape legend: E routed experts, N expert-parallel size, H hidden size, I expert FFN width.
"""

from __future__ import annotations

import re

import torch

from connito.models.families import MoELayout

AUTOEP_EXPERT_PARAMS = ("w1", "w2", "w3")
HF_EXPERT_PARAMS = ("gate_up_proj", "down_proj")
AUTOEP_EXPERT_NAME = re.compile(r"(.*)\.experts\.(w[123])$")
"""``<block>.experts.w1`` -> (block, ``w1``)."""


def fuse_experts(w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> dict[str, torch.Tensor]:
    """AutoEP ``w1`` (gate), ``w3`` (up), ``w2`` (down) -> transformers ``gate_up_proj`` (gate rows first) and
    ``down_proj``. Works on stacks [E, ...] and on one expert alike (the row dimension is -2)."""
    return {"gate_up_proj": torch.cat([w1, w3], dim=-2), "down_proj": w2}


def split_experts(gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> dict[str, torch.Tensor]:
    """The inverse of :func:`fuse_experts`: views of ``gate_up_proj``'s gate and up rows, and ``down_proj``."""
    width = gate_up_proj.shape[-2] // 2
    return {"w1": gate_up_proj[..., :width, :], "w3": gate_up_proj[..., width:, :], "w2": down_proj}


def hf_expert_param(autoep_param: str) -> str:
    """The fused transformers parameter an AutoEP expert parameter is part of."""
    return "down_proj" if autoep_param == "w2" else "gate_up_proj"


def _renames(layout: MoELayout) -> list[tuple[str, str]]:
    """(AutoEP prefix, transformers prefix) pairs for the non-expert tensors of a block, longest first."""
    pairs = [
        ("router.gate.", f"{layout.router_attr}."),
        ("gate.gate.", f"{layout.router_attr}."),
        ("router.", f"{layout.router_attr}."),  # e_score_correction_bias
    ]
    if layout.shared_expert_gate_attr:
        pairs.append(("shared_experts_gate.", f"{layout.shared_expert_gate_attr}."))
    if layout.shared_experts_attr:
        pairs.append(("shared_experts.", f"{layout.shared_experts_attr}."))
    return sorted(pairs, key=lambda pair: -len(pair[0]))


def hf_name(relative: str, layout: MoELayout) -> str | None:
    """The transformers name (relative to the block) of AutoEP's non-expert tensor ``relative``; None for expert
    tensors and AutoEP's own buffers (``tokens_per_expert``, ``expert_bias``), which transformers has no place for."""
    if relative.startswith("experts."):
        return None
    for autoep, hf in _renames(layout):
        if relative.startswith(autoep):
            return hf + relative[len(autoep) :]
    return None


def autoep_names(relative: str, layout: MoELayout) -> list[str]:
    """Every AutoEP name (relative to the block) holding transformers' non-expert tensor ``relative``: the router
    lives under ``router.gate`` and its alias ``gate.gate`` (its choice bias under ``router`` and ``gate``)."""
    out = []
    for autoep, hf in _renames(layout):
        if not relative.startswith(hf):
            continue
        rest = relative[len(hf) :]
        is_bias = rest == "e_score_correction_bias"
        if autoep in ("router.gate.", "gate.gate.") and not is_bias:
            out.append(autoep + rest)
        elif autoep == "router." and is_bias:
            out += [autoep + rest, "gate." + rest]
        elif autoep.startswith("shared_experts"):
            out.append(autoep + rest)
    return out


def block_of(name: str, blocks: list[str]) -> tuple[str, str] | None:
    """(block prefix, name relative to it) for the first of ``blocks`` that ``name`` lies under, else None."""
    for block in blocks:
        if name.startswith(block + "."):
            return block, name[len(block) + 1 :]
    return None


def to_hf_state(tensors: dict[str, torch.Tensor], blocks: list[str], layout: MoELayout) -> dict[str, torch.Tensor]:
    """A state dict in AutoEP names, every expert present (``experts.w*`` [E, ...]), -> the transformers names.

    Tensors outside ``blocks`` pass through; AutoEP's own buffers are dropped."""
    out = {}
    for name, tensor in tensors.items():
        where = block_of(name, blocks)
        if where is None:
            out[name] = tensor
            continue
        block, relative = where
        mapped = hf_name(relative, layout)
        if mapped is not None:
            out[f"{block}.{mapped}"] = tensor
    for block in blocks:
        if f"{block}.experts.w1" in tensors:
            fused = fuse_experts(*(tensors[f"{block}.experts.{w}"] for w in ("w1", "w3", "w2")))
            for param, tensor in fused.items():
                out[f"{block}.{layout.experts_attr}.{param}"] = tensor
    return out


def autoep_slice(
    hf: dict[str, torch.Tensor], name: str, blocks: list[str], layout: MoELayout, local: int, ep_rank: int
) -> torch.Tensor | None:
    """AutoEP tensor ``name`` of expert-parallel rank ``ep_rank`` (holding ``local`` experts per layer), cut out of
    a transformers-named dict with every expert; None when ``hf`` lacks its source."""
    match = AUTOEP_EXPERT_NAME.fullmatch(name)
    if match and match.group(1) in blocks:
        block, w = match.groups()
        gate_up = hf.get(f"{block}.{layout.experts_attr}.gate_up_proj")
        down = hf.get(f"{block}.{layout.experts_attr}.down_proj")
        if gate_up is None or down is None:
            return None
        return split_experts(gate_up, down)[w][local * ep_rank : local * (ep_rank + 1)].contiguous()
    where = block_of(name, blocks)
    if where is None:
        source = name
    else:
        mapped = hf_name(where[1], layout)
        source = None if mapped is None else f"{where[0]}.{mapped}"
    tensor = hf.get(source) if source is not None else None
    return None if tensor is None else tensor.clone()
