"""The torch path of :func:`connito.kernels.expert_weight_grad`, and the reference every other path is tested against.

Shape legend (suffixes of the tensor names):

    S  routed rows: the (token, expert) pairs of one MoE layer, sorted by expert
    K  input width of the expert GEMM (columns of x)
    N  output width of the expert GEMM (columns of dy)
    E  experts of the layer (entries of ``offsets_E``)
    G  experts whose weight gradient is wanted (entries of ``experts_G``)
    R  rows of one expert (a slice of S)

Expert ``e`` owns the rows ``[offsets_E[e - 1], offsets_E[e])`` of ``x_SK`` and ``dy_SN`` (``offsets_E[-1]`` read as 0),
and its weight gradient is ``dy_SN[rows].T @ x_SK[rows]``, an ``[N, K]`` matrix. This module computes it for the G
wanted experts only: one ``torch.mm`` per wanted expert over its row slice, nothing clever. The offsets and expert
indices come to the host once (one device sync per call), which also lets this path check them fully: unlike the
Triton path it rejects offsets that decrease, run past S, or expert indices out of range or repeated.

Accumulation is in fp32 for 16-bit inputs (each expert's row slice is upcast before its GEMM, so the upcast costs
memory for one expert's rows at a time, never for all of x) and in the input's own dtype otherwise (fp32, fp64); the
result is written in x's dtype. For fp32 inputs the result is exactly ``dy[a:b].T @ x[a:b]``, bit for bit.
"""

from __future__ import annotations

import torch

__all__ = ["accumulation_dtype", "expert_row_ranges", "torch_expert_weight_grad"]

# Inputs of these dtypes are upcast to fp32 before the GEMM; any other floating dtype accumulates in itself.
_UPCAST_TO_FP32 = (torch.float16, torch.bfloat16)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the weight gradient is accumulated in for inputs of ``dtype``: fp32 for 16-bit floats, else itself."""
    return torch.float32 if dtype in _UPCAST_TO_FP32 else dtype


def expert_row_ranges(offsets_E: torch.Tensor, experts_G: torch.Tensor, num_rows: int) -> list[tuple[int, int]]:
    """Row range ``(start, end)`` of each wanted expert, in the order of ``experts_G``.

    Brings ``offsets_E`` and ``experts_G`` to the host in one transfer (a single sync when they live on a GPU), then
    checks on the host what the public entry point cannot check cheaply: every wanted expert index lies in ``[0, E)``
    and appears once, and the offsets up to each wanted expert are non-decreasing and at most ``num_rows`` (S).
    Raises ValueError naming the first problem found.
    """
    num_experts = offsets_E.numel()
    both = torch.cat([offsets_E.to(torch.int64), experts_G.to(torch.int64)]).tolist()  # the one host sync
    offsets, experts = both[:num_experts], both[num_experts:]

    if len(set(experts)) != len(experts):
        raise ValueError(f"experts_G repeats an expert index: {experts}")
    previous = 0
    for e, end in enumerate(offsets):
        if end < previous:
            raise ValueError(
                f"offsets_E must be non-decreasing cumulative end offsets; offsets_E[{e}] = {end} < {previous}"
            )
        previous = end
    if offsets and offsets[-1] > num_rows:
        raise ValueError(f"offsets_E ends at {offsets[-1]}, past the {num_rows} rows (S) of x_SK and dy_SN")

    ranges: list[tuple[int, int]] = []
    for e in experts:
        if not 0 <= e < num_experts:
            raise ValueError(f"experts_G holds expert {e}, outside [0, {num_experts}) (E = offsets_E.numel())")
        ranges.append((offsets[e - 1] if e > 0 else 0, offsets[e]))
    return ranges


def torch_expert_weight_grad(
    x_SK: torch.Tensor,
    dy_SN: torch.Tensor,
    offsets_E: torch.Tensor,
    experts_G: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``dW_GNK[g] = dy_SN[rows(experts_G[g])].T @ x_SK[rows(experts_G[g])]``, one ``torch.mm`` per wanted expert.

    Inputs are assumed to have passed :func:`connito.kernels.validate_inputs` (shapes, dtypes, devices); the row
    ranges are checked here on the host. Writes into ``out`` ([G, N, K], x's dtype) when given and returns it; an
    expert without rows gets an exact zero matrix.
    """
    num_rows, width_K = x_SK.shape
    width_N = dy_SN.shape[1]
    num_wanted = experts_G.numel()
    dW_GNK = out if out is not None else torch.empty(num_wanted, width_N, width_K, dtype=x_SK.dtype, device=x_SK.device)
    if num_wanted == 0:
        return dW_GNK

    acc_dtype = accumulation_dtype(x_SK.dtype)
    for g, (start, end) in enumerate(expert_row_ranges(offsets_E, experts_G, num_rows)):
        if start == end:
            dW_GNK[g].zero_()
            continue
        x_RK = x_SK[start:end].to(acc_dtype)  # R: the rows of this one expert; no copy when already acc_dtype
        dy_RN = dy_SN[start:end].to(acc_dtype)
        target_NK = dW_GNK[g]
        if target_NK.dtype == acc_dtype and target_NK.is_contiguous():
            torch.mm(dy_RN.T, x_RK, out=target_NK)  # straight into the output: no temporary, no copy
        else:
            target_NK.copy_(torch.mm(dy_RN.T, x_RK))
    return dW_GNK
