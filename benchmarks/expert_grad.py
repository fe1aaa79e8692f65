"""What computing the weight gradient of a subset of experts saves: ``connito.kernels`` over G wanted experts against
the weight gradient of all E experts of one MoE layer's grouped GEMM, in one process.

    python benchmarks/expert_grad.py --quick          # small smoke shape, well under a minute on a 2-core CPU
    python benchmarks/expert_grad.py                  # S=32768 routed rows, K=N=512, E=64, G=14, fp32
    python benchmarks/expert_grad.py --dtype bf16 --wanted 8 --threads 1

Shape legend: S routed rows (tokens x top-k, sorted by expert), K input width, N output width, E experts of the
layer, G experts whose gradient is wanted. Rows go to experts uniformly at random (seeded), so expert sizes are
uneven; the G wanted experts are a seeded random pick and their share of the rows is printed (it sets the ideal
speedup over the all-E GEMMs).

Implementations, all on the same tensors, each the median of ``--iters`` timed calls after ``--warmup`` untimed ones
(``time.perf_counter``; ``torch.cuda.synchronize`` around each call on CUDA). The timed calls are interleaved:
each round times every implementation once, so a burst of load from elsewhere hits them all alike. ``min ms`` is the
fastest timed call, the least disturbed by such load:

| name | what |
|---|---|
| ``subset-torch`` | ``connito.kernels`` torch path: one ``torch.mm`` per wanted expert (G GEMMs) |
| ``subset-triton`` | ``connito.kernels`` Triton kernel over the G experts (CUDA only) |
| ``all-mm-loop`` | the torch path over all E experts: what a frozen-agnostic loop backward costs |
| ``all-grouped_mm`` | ``F.grouped_mm(dy_SN.T, x_SK, offs=offsets_E)``: the dW a grouped GEMM computes for all E |

``all-grouped_mm`` is skipped, with the reason in the table, where ``F.grouped_mm`` fails on the device (on CPU it
wants 16-byte-aligned strides). On a CPU shared with other jobs, ``--threads 1`` gives steadier numbers.

``max abs diff`` compares each result's rows for the wanted experts with ``subset-torch``. Nothing is asserted: this
is a timing script, and its numbers depend on the machine and its load. Recorded runs go in RESULTS.md by hand.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from connito.kernels import choose_path, torch_expert_weight_grad  # noqa: E402

DEFAULT = {"rows": 4096 * 8, "width_k": 512, "width_n": 512, "experts": 64, "wanted": 14}
QUICK = {"rows": 8192, "width_k": 256, "width_n": 256, "experts": 32, "wanted": 7}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=None, help=f"S, routed rows (default {DEFAULT['rows']})")
    p.add_argument("--width-k", type=int, default=None, help=f"K, input width (default {DEFAULT['width_k']})")
    p.add_argument("--width-n", type=int, default=None, help=f"N, output width (default {DEFAULT['width_n']})")
    p.add_argument("--experts", type=int, default=None, help=f"E, experts of the layer (default {DEFAULT['experts']})")
    p.add_argument("--wanted", type=int, default=None, help=f"G, experts given a dW (default {DEFAULT['wanted']})")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per implementation (default 2)")
    p.add_argument("--iters", type=int, default=None, help="timed calls per implementation (default 7)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all usable cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help=f"small smoke shape: {QUICK}")
    args = p.parse_args(argv)
    base = QUICK if args.quick else DEFAULT
    for key, value in base.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.warmup = args.warmup if args.warmup is not None else 2
    args.iters = args.iters if args.iters is not None else 7
    if not 0 <= args.wanted <= args.experts:
        p.error(f"--wanted must lie in [0, --experts = {args.experts}], got {args.wanted}")
    return args


def make_inputs(args: argparse.Namespace, device: torch.device) -> dict[str, torch.Tensor]:
    """x_SK, dy_SN sorted by expert, end offsets_E (int32, what grouped_mm takes), and the wanted experts_G."""
    generator = torch.Generator().manual_seed(args.seed)
    dtype = DTYPES[args.dtype]
    expert_of_row_S = torch.randint(args.experts, (args.rows,), generator=generator)
    counts_E = torch.bincount(expert_of_row_S, minlength=args.experts)
    experts_G = torch.randperm(args.experts, generator=generator)[: args.wanted]
    return {
        "x_SK": torch.randn(args.rows, args.width_k, generator=generator).to(device=device, dtype=dtype),
        "dy_SN": torch.randn(args.rows, args.width_n, generator=generator).to(device=device, dtype=dtype),
        "offsets_E": counts_E.cumsum(0).to(device=device, dtype=torch.int32),
        "experts_G": experts_G.to(device),
        "counts_E": counts_E,
    }


def time_interleaved(
    impls: dict[str, Callable[[], torch.Tensor]], args: argparse.Namespace, device: torch.device
) -> tuple[dict[str, list[float]], dict[str, torch.Tensor], dict[str, str]]:
    """ms of every timed call per implementation, the last result of each, and why any implementation was skipped.

    Rounds are interleaved (each round times every implementation once), so a burst of load from elsewhere on the
    machine lands on all of them rather than on whichever ran during it.
    """

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    results: dict[str, torch.Tensor] = {}
    skipped: dict[str, str] = {}
    for name, fn in impls.items():
        try:
            for _ in range(max(args.warmup, 1)):
                results[name] = fn()
            sync()
        except (RuntimeError, ValueError, NotImplementedError) as error:  # reported in the table, not hidden
            skipped[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
            print(f"[{name}] skipped: {skipped[name]}", flush=True)
    times: dict[str, list[float]] = {name: [] for name in results}
    for _ in range(args.iters):
        for name in times:
            sync()
            start = time.perf_counter()
            results[name] = impls[name]()
            sync()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times, results, skipped


def implementations(inputs: dict[str, torch.Tensor], device: torch.device) -> dict[str, Callable[[], torch.Tensor]]:
    """name -> a call returning [G, N, K] (subset) or [E, N, K] (all experts)."""
    x_SK, dy_SN, offsets_E, experts_G = inputs["x_SK"], inputs["dy_SN"], inputs["offsets_E"], inputs["experts_G"]
    all_E = torch.arange(offsets_E.numel(), device=device)
    impls: dict[str, Callable[[], torch.Tensor]] = {
        "subset-torch": lambda: torch_expert_weight_grad(x_SK, dy_SN, offsets_E, experts_G),
    }
    if device.type == "cuda":
        from connito.kernels.triton_expert_grad import triton_expert_weight_grad

        impls["subset-triton"] = lambda: triton_expert_weight_grad(x_SK, dy_SN, offsets_E, experts_G)
    impls["all-mm-loop"] = lambda: torch_expert_weight_grad(x_SK, dy_SN, offsets_E, all_E)
    impls["all-grouped_mm"] = lambda: F.grouped_mm(dy_SN.T, x_SK, offs=offsets_E)
    return impls


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    inputs = make_inputs(args, device)
    experts_G = inputs["experts_G"]
    wanted_rows = int(inputs["counts_E"][experts_G.cpu()].sum())

    print(f"# expert weight-gradient benchmark: G experts vs all E  (device {device}, torch {torch.__version__})")
    print(
        f"S={args.rows} K={args.width_k} N={args.width_n} E={args.experts} G={args.wanted} dtype={args.dtype} "
        f"threads={torch.get_num_threads()} warmup={args.warmup} iters={args.iters}; "
        f"wanted experts hold {wanted_rows} of {args.rows} rows ({wanted_rows / max(args.rows, 1):.1%})"
    )
    print(f"connito.kernels.expert_weight_grad would run the {' path: '.join(choose_path(device, DTYPES[args.dtype]))}")

    impls = implementations(inputs, device)
    times, results, skipped = time_interleaved(impls, args, device)
    reference_GNK = results["subset-torch"].float()
    timed = {name: statistics.median(ms) for name, ms in times.items()}
    baselines = [name for name in ("all-grouped_mm", "all-mm-loop") if name in timed]
    print()
    header = " | ".join(f"speedup vs {b}" for b in baselines)
    print(f"| implementation | ms (median) | min ms | {header} | max abs diff |")
    print("|---|---:|---:|" + "---:|" * len(baselines) + "---:|")
    for name in impls:
        if name in skipped:
            print(f"| {name} | - | - | " + " | ".join("-" for _ in baselines) + f" | skipped: {skipped[name]} |")
            continue
        wanted_GNK = results[name] if name.startswith("subset") else results[name][experts_G]
        diff = (wanted_GNK.float() - reference_GNK).abs().max().item() if wanted_GNK.numel() else 0.0
        ratios = " | ".join(f"{timed[b] / timed[name]:.2f}x" for b in baselines)
        print(f"| {name} | {timed[name]:.2f} | {min(times[name]):.2f} | {ratios} | {diff:.2e} |")
    print()
    print("speedup vs X = X ms / implementation ms. max abs diff: the wanted experts' dW against subset-torch.")


if __name__ == "__main__":
    main()
