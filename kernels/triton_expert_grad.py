"""The Triton path of :func:`connito.kernels.expert_weight_grad`: one launch for the weight gradients of G experts.

Shape legend (suffixes of the tensor names):

    S  routed rows: the (token, expert) pairs of one MoE layer, sorted by expert
    K  input width of the expert GEMM (columns of x)
    N  output width of the expert GEMM (columns of dy)
    E  experts of the layer (entries of ``offsets_E``)
    G  experts whose weight gradient is wanted (entries of ``experts_G``)

The grid is ``(G, cdiv(N, BLOCK_N), cdiv(K, BLOCK_K))``. Program ``(g, n, k)`` looks up ``e = experts_G[g]`` and that
expert's row range ``[offsets_E[e - 1], offsets_E[e])`` (``offsets_E[-1]`` read as 0), walks the range in chunks of
BLOCK_S rows accumulating ``tl.dot(tl.trans(dy_tile), x_tile)`` in fp32, and stores its ``[BLOCK_N, BLOCK_K]`` tile
of ``dW_GNK[g]`` masked at the N and K edges. An expert without rows runs no iteration and stores zeros. Nothing is
synced to the host: unlike the torch path, this one trusts the offsets and expert indices (the public entry point
only checks shapes, dtypes and devices).

fp32 inputs use ``input_precision="ieee"`` (full fp32 products, no tensor cores) unless
``torch.backends.cuda.matmul.allow_tf32`` is set, when they use tf32 as ``torch.mm`` would; results then differ from
the torch path only by summation order. 16-bit inputs multiply on tensor cores with fp32 accumulation.

Importing this module imports triton; :mod:`connito.kernels` imports it only when the Triton path runs.

When the kernel is interpreted (``TRITON_INTERPRET=1``, for tests on CPU): ``triton.jit`` reads the setting when it
*decorates* a function, not at launch; it returns a compiled ``JITFunction`` or an ``InterpretedFunction``. Parts of
``triton.language``'s own library (``tl.zeros``, ``tl.cdiv``, ...) are ``@triton.jit`` functions decorated when
``import triton`` runs, so in practice the mode is fixed by the environment at the process's first ``import triton``;
setting the variable later gives a GPU-only kernel, and launching that on CPU tensors raises the RuntimeError of
:func:`triton_expert_weight_grad` below. Interpreter tests therefore run in a fresh process.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["BLOCK_K", "BLOCK_N", "BLOCK_S", "TRITON_DTYPES", "triton_expert_weight_grad"]

# tl.dot needs every dimension >= 16. 64 x 64 fp32 accumulator tiles, 32 rows per step: a middle-of-the-road choice
# for K, N in the hundreds to low thousands (expert FFN shapes); not autotuned.
BLOCK_S = 32
BLOCK_N = 64
BLOCK_K = 64

# Input dtypes the kernel takes (x and dy share one). fp64 goes to the torch path.
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _expert_grad_kernel(
    x_ptr,
    dy_ptr,
    offsets_ptr,
    experts_ptr,
    out_ptr,
    N,
    K,
    stride_x_s,
    stride_x_k,
    stride_dy_s,
    stride_dy_n,
    stride_out_g,
    stride_out_n,
    stride_out_k,
    BLOCK_S: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    pid_g = tl.program_id(0).to(tl.int64)  # G * N * K may pass 2**31 elements
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)

    expert = tl.load(experts_ptr + pid_g).to(tl.int64)
    end = tl.load(offsets_ptr + expert).to(tl.int64)
    # offsets_E holds end offsets: expert 0 starts at row 0. Load a valid address either way, then select.
    start = tl.load(offsets_ptr + tl.maximum(expert - 1, 0)).to(tl.int64)
    start = tl.where(expert > 0, start, 0)

    rows_S = tl.arange(0, BLOCK_S)
    cols_N = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols_K = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    in_N = cols_N < N
    in_K = cols_K < K

    acc_NK = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for chunk in range(start, end, BLOCK_S):
        rows = chunk + rows_S
        in_rows = rows < end
        dy_tile_SN = tl.load(
            dy_ptr + rows[:, None] * stride_dy_s + cols_N[None, :] * stride_dy_n,
            mask=in_rows[:, None] & in_N[None, :],
            other=0.0,
        )
        x_tile_SK = tl.load(
            x_ptr + rows[:, None] * stride_x_s + cols_K[None, :] * stride_x_k,
            mask=in_rows[:, None] & in_K[None, :],
            other=0.0,
        )
        acc_NK += tl.dot(tl.trans(dy_tile_SN), x_tile_SK, input_precision=INPUT_PRECISION)

    out_ptrs = out_ptr + pid_g * stride_out_g + cols_N[:, None] * stride_out_n + cols_K[None, :] * stride_out_k
    tl.store(out_ptrs, acc_NK.to(out_ptr.dtype.element_ty), mask=in_N[:, None] & in_K[None, :])


def _interpreted() -> bool:
    """Whether both this kernel and triton.language's own jit functions were built for the interpreter."""
    return all(type(fn).__name__ == "InterpretedFunction" for fn in (_expert_grad_kernel, tl.zeros))


def _input_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"  # ignored by tl.dot for 16-bit inputs


def triton_expert_weight_grad(
    x_SK: torch.Tensor,
    dy_SN: torch.Tensor,
    offsets_E: torch.Tensor,
    experts_G: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``dW_GNK[g] = dy_SN[rows(experts_G[g])].T @ x_SK[rows(experts_G[g])]`` in one Triton launch.

    Same contract as :func:`connito.kernels.expert_weight_grad`, whose checks the inputs are assumed to have passed;
    x and dy must be fp16, bf16 or fp32. Any strides are fine (they are passed to the kernel). Writes into ``out``
    ([G, N, K], x's dtype, any strides) when given and returns it.
    """
    if x_SK.dtype not in TRITON_DTYPES:
        raise ValueError(f"the Triton path takes {TRITON_DTYPES} inputs, not {x_SK.dtype}")
    width_K = x_SK.shape[1]
    width_N = dy_SN.shape[1]
    num_wanted = experts_G.numel()
    dW_GNK = out if out is not None else torch.empty(num_wanted, width_N, width_K, dtype=x_SK.dtype, device=x_SK.device)
    if num_wanted == 0 or width_N == 0 or width_K == 0:
        return dW_GNK

    if x_SK.device.type != "cuda" and not _interpreted():
        raise RuntimeError(
            f"the Triton kernel was built for the GPU but the tensors are on {x_SK.device.type}: set "
            "TRITON_INTERPRET=1 before the process first imports triton (a fresh process) to interpret it on CPU"
        )
    grid = (num_wanted, triton.cdiv(width_N, BLOCK_N), triton.cdiv(width_K, BLOCK_K))
    _expert_grad_kernel[grid](
        x_SK,
        dy_SN,
        offsets_E,
        experts_G,
        dW_GNK,
        width_N,
        width_K,
        x_SK.stride(0),
        x_SK.stride(1),
        dy_SN.stride(0),
        dy_SN.stride(1),
        dW_GNK.stride(0),
        dW_GNK.stride(1),
        dW_GNK.stride(2),
        BLOCK_S=BLOCK_S,
        BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K,
        INPUT_PRECISION=_input_precision(x_SK.dtype),
    )
    return dW_GNK
