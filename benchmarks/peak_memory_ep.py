"""Memory per rank of a Connito training run at expert-parallel size 1 and 2 (2 ranks, CPU, gloo).

Runs `connito`'s trainer under torchrun once per ep_size, on a small qwen3_moe whose experts dominate the
parameter count, and prints per rank: parameters held, AdamW state held (bytes), and peak RSS of the process.
Parameters and optimizer state are exact counts; peak RSS includes the Python, torch and DeepSpeed runtime
(hundreds of MB on CPU), so compare its differences, not its absolute values.

    python benchmarks/peak_memory_ep.py                 # ep 1 vs ep 2, 2 ranks, 32 experts
    python benchmarks/peak_memory_ep.py --experts 64 --steps 5
"""

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def worker(out_dir: Path, overrides: list[str]) -> None:
    sys.path.insert(0, str(REPO))
    import torch.distributed as dist

    from connito.parallel import local_parameter_count
    from connito.training.trainer import run_training
    from tests.helpers import compose_train

    result = run_training(compose_train(overrides), out_dir / "run")
    optimizer = result.engine.optimizer
    while hasattr(optimizer, "optimizer"):  # ZeRO wrappers hold the torch optimizer
        optimizer = optimizer.optimizer
    state_bytes = sum(
        t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if hasattr(t, "numel")
    )
    rank = dist.get_rank()
    record = {
        "rank": rank,
        "params": local_parameter_count(result.model),
        "optimizer_state_bytes": state_bytes,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    (out_dir / f"rank{rank}.json").write_text(json.dumps(record))
    dist.barrier()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(ep_size: int, args, cache: Path) -> list[dict]:
    overrides = [
        f"parallel.ep_size={ep_size}",
        f"train.steps={args.steps}",
        "train.eval_every=0",
        "train.export=false",
        "train.checkpoint_every=0",
        "train.micro_batch_size=4",
        "train.eval_batches=1",
        f"data.cache_dir={cache}",
        "data.max_chars_per_domain=120000",
        "data.vocab_size=512",
        "data.seq_len=64",
        "logging.wandb=false",
        "logging.progress=false",
        f"model.hf_config.num_experts={args.experts}",
        f"model.hf_config.hidden_size={args.hidden}",
        f"model.hf_config.moe_intermediate_size={args.expert_ffn}",
    ]
    with tempfile.TemporaryDirectory() as out:
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
        env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled")
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
            __file__,
            "--worker",
            out,
            *overrides,
        ]
        subprocess.run(command, check=True, env=env, cwd=REPO, capture_output=not args.verbose)
        return [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(2)]


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        return worker(Path(sys.argv[2]), sys.argv[3:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--expert-ffn", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        rows = {ep: launch(ep, args, Path(cache)) for ep in (1, 2)}
    shape = f"{args.experts} experts, hidden {args.hidden}, expert FFN {args.expert_ffn}"
    print(f"qwen3_moe, {shape}, 2 ranks, fp32, CPU\n")
    print("| ep_size | rank | parameters held | AdamW state (MiB) | peak RSS (MiB) |")
    print("|---|---|---|---|---|")
    for ep, records in rows.items():
        for r in records:
            state_mib = r["optimizer_state_bytes"] / 2**20
            print(f"| {ep} | {r['rank']} | {r['params']:,} | {state_mib:.1f} | {r['peak_rss_mib']:.0f} |")
    p1, p2 = rows[1][0]["params"], rows[2][0]["params"]
    s1, s2 = rows[1][0]["optimizer_state_bytes"], rows[2][0]["optimizer_state_bytes"]
    print(
        f"\nep 2 / ep 1 per rank: parameters {p2 / p1:.2f}, AdamW state {s2 / s1:.2f}, "
        f"peak RSS {rows[2][0]['peak_rss_mib'] / rows[1][0]['peak_rss_mib']:.2f}"
    )


if __name__ == "__main__":
    main()
