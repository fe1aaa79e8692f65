"""Kernels for Connito's lean selective training: the weight gradient of a grouped GEMM, for a subset of experts only.

When a run trains a few experts of each MoE layer (ESFT-like selection, ``callbacks.trainable``), the frozen experts
still need the input gradient of their GEMMs, but not their weight gradient. A grouped-GEMM backward computes the
weight gradient of every expert anyway; :func:`expert_weight_grad` computes it for the wanted experts only, so a frozen
expert costs no dW GEMM at all.

Shape legend (suffixes of the tensor names, here and in the modules beside this one):

    S  routed rows: the (token, expert) pairs of one MoE layer, sorted by expert
    K  input width of the expert GEMM (columns of x)
    N  output width of the expert GEMM (columns of dy)
    E  experts of the layer (entries of ``offsets_E``)
    G  experts whose weight gradient is wanted (entries of ``experts_G``)

Contract: ``offsets_E`` holds cumulative *end* offsets (``cumsum(tokens_per_expert)``, as transformers computes them),
so expert ``e`` owns rows ``[offsets_E[e - 1], offsets_E[e])`` with ``offsets_E[-1]`` read as 0, and

    dW_GNK[g] = dy_SN[rows(experts_G[g])].T @ x_SK[rows(experts_G[g])]

accumulated in fp32 (fp64 for fp64 inputs) and returned in x's dtype; an expert without rows gets exact zeros.

Two implementations, one entry point:

* ``torch_expert_grad``: one ``torch.mm`` per wanted expert. Runs anywhere; it is also the reference the tests hold
  the other path to.
* ``triton_expert_grad``: one Triton launch over (expert, N tile, K tile). Runs on CUDA, or on CPU under the Triton
  interpreter for testing. triton is imported only when this path is chosen.

:func:`expert_weight_grad` picks the Triton path when the tensors are on CUDA, their dtype is fp16/bf16/fp32 and triton
imports; or when ``TRITON_INTERPRET=1`` and ``CONNITO_KERNELS=triton`` are both set (forces the interpreted kernel on
CPU). ``CONNITO_KERNELS=torch`` forces the torch path. Each distinct choice is logged once, with its reason, on the
``connito.kernels`` logger at INFO.
"""

from __future__ import annotations

import logging
import os

import torch

from .torch_expert_grad import accumulation_dtype, torch_expert_weight_grad

__all__ = ["accumulation_dtype", "choose_path", "expert_weight_grad", "torch_expert_weight_grad", "validate_inputs"]

logger = logging.getLogger("connito.kernels")

_INDEX_DTYPES = (torch.int32, torch.int64)
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # kept equal to triton_expert_grad.TRITON_DTYPES
_TRUE_STRINGS = ("1", "true", "on", "yes")  # what triton's getenv_bool takes as true (case-insensitive)
_logged_choices: set[tuple[str, str]] = set()
_triton_import_error: str | None = None
_triton_import_tried = False


def validate_inputs(
    x_SK: torch.Tensor,
    dy_SN: torch.Tensor,
    offsets_E: torch.Tensor,
    experts_G: torch.Tensor,
    out: torch.Tensor | None = None,
) -> None:
    """Check what costs no device sync: dimensions, sizes, dtypes, devices. Raises ValueError naming the problem.

    Not checked here (that would read the tensors): that the offsets are non-decreasing and end at most at S, and that
    the expert indices are distinct and in ``[0, E)``. The torch path checks those on the host; the Triton path
    trusts them.
    """
    if x_SK.dim() != 2:
        raise ValueError(f"x_SK must be 2-D [S, K], got shape {tuple(x_SK.shape)}")
    if dy_SN.dim() != 2:
        raise ValueError(f"dy_SN must be 2-D [S, N], got shape {tuple(dy_SN.shape)}")
    if offsets_E.dim() != 1:
        raise ValueError(f"offsets_E must be 1-D [E], got shape {tuple(offsets_E.shape)}")
    if experts_G.dim() != 1:
        raise ValueError(f"experts_G must be 1-D [G], got shape {tuple(experts_G.shape)}")
    if x_SK.shape[0] != dy_SN.shape[0]:
        raise ValueError(
            f"x_SK and dy_SN disagree on S (routed rows): x_SK has {x_SK.shape[0]} rows, dy_SN has {dy_SN.shape[0]}"
        )
    if not x_SK.dtype.is_floating_point or x_SK.dtype != dy_SN.dtype:
        raise ValueError(f"x_SK and dy_SN must share one floating dtype, got {x_SK.dtype} and {dy_SN.dtype}")
    if offsets_E.dtype not in _INDEX_DTYPES:
        raise ValueError(f"offsets_E must be int32 or int64, got {offsets_E.dtype}")
    if experts_G.dtype not in _INDEX_DTYPES:
        raise ValueError(f"experts_G must be int64 (or int32), got {experts_G.dtype}")
    if experts_G.numel() > offsets_E.numel():
        raise ValueError(
            f"experts_G names {experts_G.numel()} experts but the layer has only E = {offsets_E.numel()} "
            "(offsets_E.numel()); expert indices must be distinct"
        )
    named = {"x_SK": x_SK, "dy_SN": dy_SN, "offsets_E": offsets_E, "experts_G": experts_G}
    if out is not None:
        named["out"] = out
    devices = {name: tensor.device for name, tensor in named.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"all inputs must be on one device, got {listing}")
    if out is not None:
        want = (experts_G.numel(), dy_SN.shape[1], x_SK.shape[1])
        if tuple(out.shape) != want:
            raise ValueError(f"out must have shape (G, N, K) = {want}, got {tuple(out.shape)}")
        if out.dtype != x_SK.dtype:
            raise ValueError(f"out must have x_SK's dtype {x_SK.dtype}, got {out.dtype}")


def _triton_importable() -> str | None:
    """None when triton imports, else the import error as text. Tried once per process."""
    global _triton_import_error, _triton_import_tried
    if not _triton_import_tried:
        _triton_import_tried = True
        try:
            import triton  # noqa: F401
        except ImportError as error:  # reported by choose_path's reason, not swallowed
            _triton_import_error = f"{type(error).__name__}: {error}"
    return _triton_import_error


def choose_path(device: torch.device, dtype: torch.dtype) -> tuple[str, str]:
    """``("triton" | "torch", reason)`` for inputs on ``device`` of ``dtype``, following the module docstring's rules.

    Raises RuntimeError when ``CONNITO_KERNELS=triton`` asks for the Triton path and triton does not import, and
    ValueError for a ``CONNITO_KERNELS`` value other than ``auto``, ``torch`` or ``triton``.
    """
    requested = os.environ.get("CONNITO_KERNELS", "auto").strip().lower() or "auto"
    if requested not in ("auto", "torch", "triton"):
        raise ValueError(f"CONNITO_KERNELS must be auto, torch or triton, got {os.environ['CONNITO_KERNELS']!r}")
    if requested == "torch":
        return "torch", "CONNITO_KERNELS=torch"

    interpret = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE_STRINGS
    forced_interpreter = interpret and requested == "triton"
    if device.type != "cuda" and not forced_interpreter:
        return "torch", (
            f"tensors are on {device.type}; the Triton kernel runs on CUDA, or on CPU only with "
            "TRITON_INTERPRET=1 and CONNITO_KERNELS=triton"
        )
    if dtype not in _TRITON_DTYPES:
        return "torch", f"the Triton kernel takes fp16, bf16 or fp32 inputs, not {dtype}"
    import_error = _triton_importable()
    if import_error is not None:
        if requested == "triton":
            raise RuntimeError(f"CONNITO_KERNELS=triton but triton does not import ({import_error})")
        return "torch", f"triton does not import ({import_error})"
    if forced_interpreter:
        return "triton", f"TRITON_INTERPRET=1 and CONNITO_KERNELS=triton (interpreted, tensors on {device.type})"
    return "triton", f"tensors on {device} and triton imports"


def _log_once(path: str, reason: str) -> None:
    if (path, reason) not in _logged_choices:
        _logged_choices.add((path, reason))
        logger.info("expert_weight_grad runs the %s path: %s", path, reason)


@torch.no_grad()
def expert_weight_grad(
    x_SK: torch.Tensor,
    dy_SN: torch.Tensor,
    offsets_E: torch.Tensor,
    experts_G: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weight gradients ``dW_GNK`` [G, N, K] of the experts ``experts_G`` only.

    Args:
        x_SK: [S, K] the routed rows (the GEMM's input), sorted by expert.
        dy_SN: [S, N] the gradient of the GEMM's output for those rows; same dtype and device as x_SK.
        offsets_E: [E] int32/int64 cumulative end offsets: expert e owns rows [offsets_E[e-1], offsets_E[e]).
        experts_G: [G] int64 expert indices, distinct, in [0, E), any order.
        out: optional [G, N, K] tensor of x's dtype to write into (any strides).

    Returns ``out`` (or a new tensor) with ``out[g] = dy_SN[rows].T @ x_SK[rows]`` for ``e = experts_G[g]``,
    accumulated in fp32 and cast to x's dtype; zeros for an expert without rows. Runs under ``torch.no_grad``: the
    result carries no autograd history. See :func:`validate_inputs` for what is checked.
    """
    validate_inputs(x_SK, dy_SN, offsets_E, experts_G, out)
    path, reason = choose_path(x_SK.device, x_SK.dtype)
    _log_once(path, reason)
    if path == "triton":
        from .triton_expert_grad import triton_expert_weight_grad

        return triton_expert_weight_grad(x_SK, dy_SN, offsets_E, experts_G, out)
    return torch_expert_weight_grad(x_SK, dy_SN, offsets_E, experts_G, out)
