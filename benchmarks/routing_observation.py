"""What looking at routing costs: a plain forward against the same forward with Connito's router observation and
streaming statistics attached, and the time of a full driver scan, on the quickstart-sized model.

    python benchmarks/routing_observation.py                 # quickstart shape: 4 layers x 8 experts, 8 x 256 tokens
    python benchmarks/routing_observation.py --experts 64 --top-k 8 --threads 1

Three forwards, each the median of ``--iters`` timed runs after ``--warmup`` untimed ones, under ``torch.no_grad``:

* ``plain``: the transformers model alone;
* ``observed``: with a :class:`connito.routing.RouterObserver` and one subscriber that only counts records (the hook
  machinery itself);
* ``statistics``: with :class:`connito.analysis.statistics.RoutingStatistics` attached (what ``connito analyze``
  runs: per-domain counts, gate sums, co-activation, all accumulated in float64 on the CPU).

Then one full driver scan (every layer x expert, up and down) over one batch, at the default experts per forward.
Random weights (timings do not depend on training); ratios are to ``plain``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM


def build(args) -> torch.nn.Module:
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "qwen3_moe",
        vocab_size=4096,
        hidden_size=128,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        intermediate_size=256,
        moe_intermediate_size=128,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        norm_topk_prob=True,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    return AutoModelForCausalLM.from_config(config).eval()


def median_time(fn, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=15)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all usable cores)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from connito.analysis.drivers import DEFAULT_EXPERTS_PER_FORWARD, driver_scan
    from connito.analysis.statistics import RoutingStatistics
    from connito.experts import ExpertView
    from connito.routing import RouterObserver

    model = build(args)
    view = ExpertView(model)
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 4096, (args.batch, args.seq), generator=generator)
    domain_ids = torch.randint(0, 4, (args.batch, args.seq), generator=generator)

    def forward() -> None:
        with torch.no_grad():
            model(input_ids=input_ids)

    rows = {"plain": median_time(forward, args.warmup, args.iters)}
    observer = RouterObserver(model, view)
    seen = []
    subscription = observer.subscribe(lambda record: seen.append(record.layer))
    rows["observed"] = median_time(forward, args.warmup, args.iters)
    subscription.remove()

    stats = RoutingStatistics(view, 4)
    subscription = stats.attach(observer)

    def forward_with_statistics() -> None:
        stats.set_domains(domain_ids.reshape(-1))
        forward()

    rows["statistics"] = median_time(forward_with_statistics, args.warmup, args.iters)
    subscription.remove()
    observer.close()

    start = time.perf_counter()
    driver_scan(model, [input_ids], [domain_ids], num_domains=4, view=view, progress=False)
    scan = time.perf_counter() - start

    tokens = args.batch * args.seq
    print(
        f"qwen3_moe, {args.layers} layers x {args.experts} experts, top-{args.top_k}, {tokens} tokens per forward, "
        f"{torch.get_num_threads()} threads; median of {args.iters}"
    )
    print("| forward | ms | ratio to plain |")
    print("|---|---|---|")
    for name, seconds in rows.items():
        print(f"| {name} | {seconds * 1e3:.1f} | {seconds / rows['plain']:.3f} |")
    scanned = len(view.moe_layers) * view.num_experts
    print(
        f"\ndriver scan: {scanned} experts x (up, down) on {tokens} tokens, {DEFAULT_EXPERTS_PER_FORWARD} experts per "
        f"forward: {scan:.1f} s ({scan / rows['plain']:.0f} plain forwards)"
    )


if __name__ == "__main__":
    main()
