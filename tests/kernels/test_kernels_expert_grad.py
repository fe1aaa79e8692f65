"""connito.kernels.expert_weight_grad: the weight gradient of a grouped GEMM for a subset of experts.

Shape legend: S routed rows (sorted by expert), K input width, N output width, E experts, G experts whose gradient is
wanted; ``offsets_E`` are cumulative end offsets (``cumsum(tokens_per_expert)``).

* torch path: bit-identical (``torch.equal``) to an independent python loop of ``dy[a:b].T @ x[a:b]``;
* Triton kernel under the interpreter, against the torch path. ``triton.jit`` reads ``TRITON_INTERPRET`` when it
  decorates a function, and ``import triton`` already decorates parts of ``triton.language`` (``tl.zeros``, ...), so
  the mode is fixed at the process's first ``import triton``. These checks run in a fresh interpreter
  (``subprocess``) with the variable set from the start, whatever this pytest process has imported;
* the Triton kernel compiled for sm_90 here, without a GPU (the interpreter accepts code the compiler rejects);
* the Triton kernel on CUDA (``gpu`` marker; skipped without a device);
* the dispatch rules, the log line, and input validation.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import connito.kernels as kernels

REPO = Path(__file__).resolve().parents[2]


def make_case(
    counts: list[int], width_K: int, width_N: int, dtype: torch.dtype = torch.float32, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x_SK, dy_SN and int64 end offsets_E for experts owning ``counts`` rows each."""
    generator = torch.Generator().manual_seed(seed)
    num_rows = sum(counts)
    x_SK = torch.randn(num_rows, width_K, generator=generator).to(dtype)
    dy_SN = torch.randn(num_rows, width_N, generator=generator).to(dtype)
    offsets_E = torch.tensor(counts, dtype=torch.int64).cumsum(0)
    return x_SK, dy_SN, offsets_E


def naive(x_SK: torch.Tensor, dy_SN: torch.Tensor, counts: list[int], experts: list[int]) -> torch.Tensor:
    """dy[a:b].T @ x[a:b] per wanted expert, row ranges from plain python sums of ``counts``; fp32 math."""
    results = []
    for e in experts:
        a, b = sum(counts[:e]), sum(counts[: e + 1])
        results.append((dy_SN[a:b].float().T @ x_SK[a:b].float()).to(x_SK.dtype))
    return torch.stack(results) if results else torch.empty(0, dy_SN.shape[1], x_SK.shape[1], dtype=x_SK.dtype)


@pytest.fixture
def torch_path(monkeypatch):
    """The public entry point with the dispatcher left to its CPU default (the torch path)."""
    monkeypatch.delenv("CONNITO_KERNELS", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return kernels.expert_weight_grad


# --- the torch path against the naive loop, bit for bit -------------------------------------------------------------


@pytest.mark.parametrize(
    "counts, experts",
    [
        ([5, 17, 1, 30, 9], [0, 1, 2, 3, 4]),  # uneven counts, every expert
        ([6, 0, 11, 0, 23], [1, 2, 3, 4]),  # experts with zero rows
        ([4, 13, 7, 19, 2, 8, 10], [5, 0, 3, 6]),  # a subset in shuffled order
        ([0, 0, 12], [0, 1]),  # only empty experts wanted
    ],
)
def test_torch_path_equals_naive_loop(torch_path, counts, experts):
    x_SK, dy_SN, offsets_E = make_case(counts, width_K=24, width_N=40)
    dW_GNK = torch_path(x_SK, dy_SN, offsets_E, torch.tensor(experts))
    assert dW_GNK.shape == (len(experts), 40, 24) and dW_GNK.dtype == torch.float32
    assert torch.equal(dW_GNK, naive(x_SK, dy_SN, counts, experts))
    for g, e in enumerate(experts):
        if counts[e] == 0:
            assert torch.count_nonzero(dW_GNK[g]) == 0


def test_torch_path_no_wanted_experts(torch_path):
    x_SK, dy_SN, offsets_E = make_case([3, 5], width_K=24, width_N=40)
    dW_GNK = torch_path(x_SK, dy_SN, offsets_E, torch.empty(0, dtype=torch.int64))
    assert dW_GNK.shape == (0, 40, 24) and dW_GNK.dtype == torch.float32


def test_torch_path_int32_offsets_strided_inputs_and_out(torch_path):
    counts, experts = [9, 0, 14, 21], [3, 1, 0]
    x_SK, dy_SN, offsets_E = make_case(counts, width_K=24, width_N=40)
    x_wide = torch.zeros(x_SK.shape[0], 48)
    x_wide[:, ::2] = x_SK  # a non-contiguous view holding the same values
    out_GKN = torch.full((3, 24, 40), float("nan"))
    out_GNK = out_GKN.transpose(1, 2)  # non-contiguous output
    dW_GNK = torch_path(x_wide[:, ::2], dy_SN, offsets_E.to(torch.int32), torch.tensor(experts), out=out_GNK)
    assert dW_GNK is out_GNK
    assert torch.equal(dW_GNK, naive(x_SK, dy_SN, counts, experts))


def test_torch_path_bf16_accumulates_in_fp32(torch_path):
    counts, experts = [40, 3, 0, 25], [0, 2, 3]
    x_SK, dy_SN, offsets_E = make_case(counts, width_K=24, width_N=40, dtype=torch.bfloat16)
    dW_GNK = torch_path(x_SK, dy_SN, offsets_E, torch.tensor(experts))
    assert dW_GNK.dtype == torch.bfloat16
    assert torch.equal(dW_GNK, naive(x_SK, dy_SN, counts, experts))  # fp32 GEMM, one rounding to bf16 at the end


@pytest.mark.parametrize(
    "offsets, experts, message",
    [
        ([4, 2, 9], [0], r"offsets_E must be non-decreasing cumulative end offsets; offsets_E\[1\] = 2 < 4"),
        ([4, 6, 99], [1], r"offsets_E ends at 99, past the 9 rows \(S\)"),
        ([4, 6, 9], [3], r"experts_G holds expert 3, outside \[0, 3\)"),
        ([4, 6, 9], [-1], r"experts_G holds expert -1, outside \[0, 3\)"),
        ([4, 6, 9], [2, 2], r"experts_G repeats an expert index: \[2, 2\]"),
    ],
)
def test_torch_path_checks_offsets_and_experts_on_host(torch_path, offsets, experts, message):
    x_SK, dy_SN, _ = make_case([9], width_K=24, width_N=40)
    with pytest.raises(ValueError, match=message):
        torch_path(x_SK, dy_SN, torch.tensor(offsets), torch.tensor(experts))


# --- input validation (no device sync) -----------------------------------------------------------------------------


def test_mismatched_rows_message():
    x_SK, dy_SN, offsets_E = make_case([5, 5], width_K=24, width_N=40)
    with pytest.raises(ValueError) as caught:
        kernels.expert_weight_grad(x_SK, dy_SN[:-1], offsets_E, torch.tensor([0]))
    assert str(caught.value) == "x_SK and dy_SN disagree on S (routed rows): x_SK has 10 rows, dy_SN has 9"


def test_other_validation_messages():
    x_SK, dy_SN, offsets_E = make_case([5, 5], width_K=24, width_N=40)
    experts_G = torch.tensor([1])
    cases = [
        ((x_SK[0], dy_SN, offsets_E, experts_G), r"x_SK must be 2-D \[S, K\], got shape \(24,\)"),
        ((x_SK, dy_SN.double(), offsets_E, experts_G), "must share one floating dtype, got torch.float32 and "),
        ((x_SK, dy_SN, offsets_E.float(), experts_G), "offsets_E must be int32 or int64, got torch.float32"),
        ((x_SK, dy_SN, offsets_E, torch.tensor([0, 1, 1])), "experts_G names 3 experts but the layer has only E = 2"),
        ((x_SK, dy_SN, offsets_E.to("meta"), experts_G), "all inputs must be on one device, got x_SK on cpu, .*meta"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            kernels.expert_weight_grad(*args)
    with pytest.raises(ValueError, match=r"out must have shape \(G, N, K\) = \(1, 40, 24\), got \(1, 24, 40\)"):
        kernels.expert_weight_grad(x_SK, dy_SN, offsets_E, experts_G, out=torch.empty(1, 24, 40))


# --- dispatch and its log line --------------------------------------------------------------------------------------


def test_dispatch_rules(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    monkeypatch.setattr(kernels, "_triton_importable", lambda: None)  # keep triton out of this process
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("CONNITO_KERNELS", raising=False)
    assert kernels.choose_path(cpu, torch.float32)[0] == "torch"
    assert kernels.choose_path(cuda, torch.bfloat16)[0] == "triton"
    assert kernels.choose_path(cuda, torch.float64) == (
        "torch",
        "the Triton kernel takes fp16, bf16 or fp32 inputs, not torch.float64",
    )
    monkeypatch.setenv("CONNITO_KERNELS", "triton")
    assert kernels.choose_path(cpu, torch.float32)[0] == "torch"  # no interpreter: nothing runs Triton on CPU
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.choose_path(cpu, torch.float32)[0] == "triton"
    monkeypatch.setenv("CONNITO_KERNELS", "torch")
    assert kernels.choose_path(cuda, torch.float32) == ("torch", "CONNITO_KERNELS=torch")
    monkeypatch.setenv("CONNITO_KERNELS", "cuda")
    with pytest.raises(ValueError, match="CONNITO_KERNELS must be auto, torch or triton, got 'cuda'"):
        kernels.choose_path(cpu, torch.float32)
    monkeypatch.setenv("CONNITO_KERNELS", "triton")
    monkeypatch.setattr(kernels, "_triton_importable", lambda: "ImportError: no triton")
    with pytest.raises(RuntimeError, match=r"CONNITO_KERNELS=triton but triton does not import"):
        kernels.choose_path(cuda, torch.float32)


def test_choice_is_logged_once(torch_path, monkeypatch, caplog):
    monkeypatch.setattr(kernels, "_logged_choices", set())
    x_SK, dy_SN, offsets_E = make_case([5, 5], width_K=24, width_N=40)
    with caplog.at_level(logging.INFO, logger="connito.kernels"):
        for _ in range(3):
            torch_path(x_SK, dy_SN, offsets_E, torch.tensor([1]))
    messages = [record.getMessage() for record in caplog.records if record.name == "connito.kernels"]
    assert messages == [
        "expert_weight_grad runs the torch path: tensors are on cpu; the Triton kernel runs on CUDA, or on CPU only "
        "with TRITON_INTERPRET=1 and CONNITO_KERNELS=triton"
    ]


# --- the Triton kernel, interpreted on CPU, in a fresh process ------------------------------------------------------

INTERPRETED_CHECKS = """
import logging, torch
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
import connito.kernels as kernels
from connito.kernels.torch_expert_grad import torch_expert_weight_grad
from connito.kernels.triton_expert_grad import TRITON_DTYPES

assert kernels._TRITON_DTYPES == TRITON_DTYPES, "the dispatcher and the kernel disagree on the dtypes it takes"

cases = [  # counts per expert, wanted experts, K, N
    ([9, 17, 0, 30, 4], [0, 1, 2, 3, 4], 24, 40),  # every expert, one of them empty
    ([12, 0, 21, 5, 33, 7], [4, 1, 0, 5], 24, 40),  # shuffled subset with an empty expert
    ([40, 0, 35], [2, 0, 1], 72, 80),  # 2 x 2 tiles of 64, both edges masked; 40 rows = 2 chunks of 32
]
generator = torch.Generator().manual_seed(0)
for counts, experts, K, N in cases:
    S = sum(counts)
    x_SK = torch.randn(S, K, generator=generator)
    dy_SN = torch.randn(S, N, generator=generator)
    offsets_E = torch.tensor(counts).cumsum(0)
    experts_G = torch.tensor(experts)
    ref_GNK = torch_expert_weight_grad(x_SK, dy_SN, offsets_E, experts_G)
    got_GNK = kernels.expert_weight_grad(x_SK, dy_SN, offsets_E, experts_G)
    torch.testing.assert_close(got_GNK, ref_GNK, rtol=1e-5, atol=1e-5)
    for g, e in enumerate(experts):
        assert counts[e] or torch.count_nonzero(got_GNK[g]) == 0, "an empty expert must give exact zeros"

    # the same through strided views: x inside a wider buffer, dy transposed, int32 offsets, a transposed out
    x_wide = torch.zeros(S, 2 * K)
    x_wide[:, ::2] = x_SK
    dy_NS = dy_SN.T.contiguous()
    out_GNK = torch.full((len(experts), K, N), float("nan")).transpose(1, 2)
    got_GNK = kernels.expert_weight_grad(x_wide[:, ::2], dy_NS.T, offsets_E.int(), experts_G, out=out_GNK)
    assert got_GNK is out_GNK
    torch.testing.assert_close(got_GNK, ref_GNK, rtol=1e-5, atol=1e-5)

empty = kernels.expert_weight_grad(x_SK, dy_SN, offsets_E, torch.empty(0, dtype=torch.int64))
assert empty.shape == (0, N, K)
print("INTERPRETED OK")
"""

TRITON_IMPORTED_BEFORE_ENV = """
import os, torch, triton
os.environ["TRITON_INTERPRET"] = "1"
import connito.kernels as kernels
x_SK, dy_SN = torch.randn(4, 16), torch.randn(4, 16)
try:
    kernels.expert_weight_grad(x_SK, dy_SN, torch.tensor([4]), torch.tensor([0]))
except RuntimeError as error:
    print(error)
"""


def run_fresh(code: str, **env: str) -> subprocess.CompletedProcess:
    environ = {key: value for key, value in os.environ.items() if key not in ("TRITON_INTERPRET", "CONNITO_KERNELS")}
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), environ.get("PYTHONPATH")]))
    environ.update(env)
    command = [sys.executable, "-c", textwrap.dedent(code)]
    return subprocess.run(command, cwd=REPO, env=environ, capture_output=True, text=True, timeout=300)


def test_triton_kernel_interpreted_matches_torch_path():
    result = run_fresh(INTERPRETED_CHECKS, TRITON_INTERPRET="1", CONNITO_KERNELS="triton")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "INTERPRETED OK" in result.stdout
    assert (
        "connito.kernels: expert_weight_grad runs the triton path: TRITON_INTERPRET=1 and CONNITO_KERNELS=triton "
        "(interpreted, tensors on cpu)"
    ) in result.stderr.splitlines()


def test_interpreter_set_after_triton_import_is_refused():
    result = run_fresh(TRITON_IMPORTED_BEFORE_ENV, CONNITO_KERNELS="triton")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "the Triton kernel was built for the GPU but the tensors are on cpu" in result.stdout


# --- the Triton kernel compiled for the GPU, without one ------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
@pytest.mark.parametrize("dtype, precision", [("fp32", "ieee"), ("bf16", "tf32")])
def test_triton_kernel_compiles_for_sm90(dtype, precision):
    """The interpreter accepts things the compiler rejects; compile (to a cubin, with triton's own ptxas) for H100."""
    import triton  # a test dependency (setup.py's test extra): missing, this fails rather than skips
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from connito.kernels.triton_expert_grad import BLOCK_K, BLOCK_N, BLOCK_S, _expert_grad_kernel

    if type(_expert_grad_kernel).__name__ == "InterpretedFunction":
        pytest.skip("TRITON_INTERPRET was set when this process imported triton: nothing to compile")
    pointers = {"x_ptr": dtype, "dy_ptr": dtype, "offsets_ptr": "i32", "experts_ptr": "i64", "out_ptr": dtype}
    signature = {name: f"*{kind}" for name, kind in pointers.items()}
    sizes = ("N", "K", "stride_x_s", "stride_x_k", "stride_dy_s", "stride_dy_n", "stride_out_g", "stride_out_n")
    signature.update({name: "i32" for name in (*sizes, "stride_out_k")})
    constexprs = {"BLOCK_S": BLOCK_S, "BLOCK_N": BLOCK_N, "BLOCK_K": BLOCK_K, "INPUT_PRECISION": precision}
    signature.update({name: "constexpr" for name in constexprs})
    source = ASTSource(fn=_expert_grad_kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
    assert compiled.asm["cubin"]
    assert ("mma" in compiled.asm["ptx"]) == (precision != "ieee")  # tensor cores unless exact fp32 was asked for


# --- the Triton kernel on CUDA --------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_triton_kernel_on_cuda_matches_torch_path(monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from connito.kernels.triton_expert_grad import triton_expert_weight_grad

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("CONNITO_KERNELS", raising=False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    device = torch.device("cuda")
    assert kernels.choose_path(device, torch.bfloat16)[0] == "triton"

    counts = [300, 0, 517, 1, 1024, 77, 0, 2049]
    experts_G = torch.tensor([7, 1, 4, 0, 3], device=device)
    x_SK, dy_SN, offsets_E = (t.to(device) for t in make_case(counts, width_K=200, width_N=136))
    ref_GNK = kernels.torch_expert_weight_grad(x_SK, dy_SN, offsets_E, experts_G)

    got_GNK = triton_expert_weight_grad(x_SK, dy_SN, offsets_E.int(), experts_G)  # fp32, "ieee" dot
    torch.testing.assert_close(got_GNK, ref_GNK, rtol=1e-4, atol=1e-4)
    assert torch.count_nonzero(got_GNK[1]) == 0

    # bf16 inputs: products are exact in fp32 and both paths accumulate in fp32, so they differ by the summation
    # order plus the one rounding of the result to bf16 (relative 2**-8 at most)
    x_bf, dy_bf = x_SK.bfloat16(), dy_SN.bfloat16()
    ref32_GNK = kernels.torch_expert_weight_grad(x_bf.float(), dy_bf.float(), offsets_E, experts_G)
    got_GNK = kernels.expert_weight_grad(x_bf, dy_bf, offsets_E, experts_G)
    assert got_GNK.dtype == torch.bfloat16
    torch.testing.assert_close(got_GNK.float(), ref32_GNK, rtol=2**-7, atol=1e-3)
