"""Where a parameter's elements live in the tensors the optimizer steps, for each ZeRO stage.

A gradient mask says which elements of each model parameter are trainable, as ranges of the flattened parameter.
The optimizer, though, does not always step model parameters:

* ZeRO 0 (fp32): the torch optimizer holds the model parameters themselves; a parameter's ranges are the
  optimizer tensor's ranges.
* ZeRO 1/2 (fp32): DeepSpeed's ``DeepSpeedZeroOptimizer`` flattens each parameter group (padded for alignment) and
  gives every data-parallel rank one contiguous fp32 partition of it, ``single_partition_of_fp32_groups[i]``; the
  inner torch optimizer steps those flat partitions, and its AdamW state has their shape. A partition cuts across
  parameters: it holds a fragment of some of them. DeepSpeed records the fragment of each parameter this rank holds
  in ``param._hp_mapping`` (``lp_fragment_address``: where it starts in the flattened parameter;
  ``hp_fragment_address``: where it starts in the flat partition; the same ``numel``); the mask follows those
  addresses. DeepSpeed relinks them when a checkpoint is loaded, so the mapping is rebuilt after every load.
  Those private attributes are read in :func:`connito.training.deepspeed_internals.zero_partitions` only.

Ranges are sorted, disjoint, half-open ``(start, stop)`` element offsets into a flattened tensor.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from connito.training.deepspeed_internals import zero_partitions

Ranges = list[tuple[int, int]]


def merge_ranges(ranges: Iterable[tuple[int, int]]) -> Ranges:
    """Sorted, disjoint ranges covering the same elements (empty ranges dropped, touching ones joined)."""
    out: Ranges = []
    for start, stop in sorted(r for r in ranges if r[1] > r[0]):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], stop))
        else:
            out.append((start, stop))
    return out


def complement(ranges: Ranges, numel: int) -> Ranges:
    """The elements of ``[0, numel)`` outside ``ranges``."""
    out, position = [], 0
    for start, stop in ranges:
        if start > position:
            out.append((position, start))
        position = max(position, stop)
    if position < numel:
        out.append((position, numel))
    return out


def rows_to_ranges(keep_R: torch.Tensor, row_numel: int) -> Ranges:
    """Ranges of the flattened tensor covered by the True rows of ``keep_R`` (rows of ``row_numel`` elements)."""
    keep = keep_R.tolist()
    out, start = [], None
    for index, value in enumerate([*keep, False]):
        if value and start is None:
            start = index
        elif not value and start is not None:
            out.append((start * row_numel, index * row_numel))
            start = None
    return out


@dataclass
class OptimizerTensor:
    """One tensor the inner torch optimizer steps, and which of its elements are trainable.

    ``trainable`` None means every element (nothing of it is masked: the optimizer handles it untouched)."""

    tensor: torch.Tensor
    trainable: Ranges | None


def optimizer_tensors(
    engine, inner: torch.optim.Optimizer, param_ranges: Mapping[int, Ranges | None]
) -> dict[int, OptimizerTensor]:
    """``id(optimizer tensor) -> OptimizerTensor`` for every tensor the inner optimizer steps.

    ``param_ranges``: ``id(model parameter) -> trainable ranges`` (None: all of it); a parameter the optimizer holds
    but the mask does not name is wholly trainable (the optimizer's own behaviour is kept for it).
    """
    stage = engine.zero_optimization_stage()
    if stage == 0:
        out = {}
        for group in inner.param_groups:
            for param in group["params"]:
                out[id(param)] = OptimizerTensor(param, param_ranges.get(id(param)))
        return out
    if stage in (1, 2):
        return _zero_partition_tensors(engine.optimizer, param_ranges)
    raise ValueError(f"no optimizer-tensor mapping for ZeRO stage {stage}")


def _zero_partition_tensors(zero, param_ranges: Mapping[int, Ranges | None]) -> dict[int, OptimizerTensor]:
    """The flat fp32 partitions of a ZeRO-1/2 optimizer, with each held fragment's ranges moved onto them."""
    out = {}
    for partition in zero_partitions(zero):
        ranges: Ranges = []
        masked = False
        for fragment in partition.fragments:
            lp = fragment.param
            own = param_ranges.get(id(lp))
            if own is None:
                own = [(0, lp.numel())]
            elif own != [(0, lp.numel())]:
                masked = True
            shift = fragment.hp_start - fragment.lp_start
            for start, stop in own:
                start, stop = max(start, fragment.lp_start), min(stop, fragment.lp_start + fragment.numel)
                if start < stop:
                    ranges.append((start + shift, stop + shift))
        out[id(partition.flat)] = OptimizerTensor(partition.flat, merge_ranges(ranges) if masked else None)
    return out
