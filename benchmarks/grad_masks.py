"""What slice-exact gradient masks save and cost: an ESFT-like run (a fraction of the routed experts, ~20%, chosen
per layer) against full fine-tuning of the same model, in one process.

    python benchmarks/grad_masks.py                          # 32 experts x 4 layers, hidden 256, ZeRO 0 and 2
    python benchmarks/grad_masks.py --zero 1 --experts 64 --fraction 0.1 --threads 1

Both runs go through Connito's trainer (one rank, fp32, CPU unless CUDA is there) on the same data and model; the
masked ones add ``callbacks.trainable`` with ``--fraction`` of each MoE layer's experts (a seeded random pick, at
least one per layer), once on the lean path (the default: the trainable experts as compact slots,
:mod:`connito.experts.lean`) and once mask-only (``callbacks.trainable.lean=false``: gradient masks inside the fused
tensors). Reported per run and ZeRO stage:

* AdamW state bytes (every tensor of the torch optimizer's state: ``exp_avg``, ``exp_avg_sq``, ``step``);
* parameters that get a gradient (``requires_grad``) and the elements that actually train;
* the median time of one optimizer step (forward, backward, step), over the steps after ``--warmup``.

The mask-only run keeps AdamW state for every expert tensor of a layer that has a chosen expert (the mask cuts inside
fused ``[E, ...]`` tensors; frozen rows cost state and weight-gradient GEMMs, not updates); the lean run keeps state
and computes weight gradients for the chosen experts alone.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from connito.training.callbacks import Callback  # noqa: E402


class StepTimer(Callback):
    def on_train_start(self, trainer) -> None:
        self.times, self.last = [], time.perf_counter()

    def on_step_end(self, trainer, losses) -> None:
        now = time.perf_counter()
        self.times.append(now - self.last)
        self.last = now


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from connito.cli import schema  # noqa: F401  (registers the typed configs)
    from connito.cli.paths import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return OmegaConf.to_object(hydra_compose(config_name="train", overrides=overrides))


def esft_like(num_layers: int, num_experts: int, fraction: float, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    per_layer = max(1, math.ceil(fraction * num_experts))
    picks = [torch.randperm(num_experts, generator=generator)[:per_layer].tolist() for _ in range(num_layers)]
    return [[layer, expert] for layer, experts in enumerate(picks) for expert in sorted(experts)]


def run(overrides: list[str], run_dir: Path, warmup: int) -> dict:
    from connito.training.optimizer_groups import inner_optimizer
    from connito.training.trainer import run_training

    timer = StepTimer()
    result = run_training(compose(overrides), run_dir, callbacks=[timer])
    optimizer = inner_optimizer(result.engine)
    state_bytes = sum(
        t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)
    )
    # the model's own parameters: lean slots are extra trainable copies of some fused expert rows, not new weights
    params = [p for n, p in result.model.named_parameters() if ".lean_experts." not in n]
    slots = [p for n, p in result.model.named_parameters() if ".lean_experts." in n]
    masks = [c for c in result.trainer.callbacks if c.name == "trainable"]
    trained = sum(m.trainable_numel() for m in masks[0].mask.masks) if masks else sum(p.numel() for p in params)
    return {
        "state_bytes": state_bytes,
        "with_grad": sum(p.numel() for p in params + slots if p.requires_grad),
        "trained": trained,
        "total": sum(p.numel() for p in params),
        "step_s": statistics.median(timer.times[warmup:]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--expert-ffn", type=int, default=256)
    parser.add_argument("--fraction", type=float, default=0.2, help="routed experts trained per MoE layer")
    parser.add_argument("--zero", type=int, nargs="+", default=[0, 2], choices=(0, 1, 2), help="ZeRO stages, in turn")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the timing")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    experts = esft_like(args.layers, args.experts, args.fraction, seed=0)
    masked_option = "+callbacks.trainable.experts=" + json.dumps(experts).replace(" ", "")
    chosen = len(experts) / (args.layers * args.experts)
    print(
        f"\nqwen3_moe, {args.layers} layers x {args.experts} experts, hidden {args.hidden}, expert FFN "
        f"{args.expert_ffn}; {len(experts)} experts trained ({chosen:.0%}); fp32, 1 rank, "
        f"{torch.get_num_threads()} threads, {args.steps} steps (median of the last {args.steps - args.warmup})\n"
    )
    print("| ZeRO | run | AdamW state (MiB) | params with a gradient | elements trained | step (ms) |")
    print("|---|---|---|---|---|---|")
    ratios = []
    for zero in args.zero:
        with tempfile.TemporaryDirectory() as tmp:
            base = [
                f"data.cache_dir={tmp}/cache",
                "data.max_chars_per_domain=120000",
                "data.vocab_size=512",
                "data.seq_len=64",
                "train.micro_batch_size=8",
                f"train.steps={args.steps}",
                "train.eval_every=0",
                "train.eval_batches=1",
                "train.checkpoint_every=0",
                "train.export=false",
                "logging.wandb=false",
                "logging.progress=false",
                f"engine=zero{zero}",
                f"model.hf_config.num_hidden_layers={args.layers}",
                f"model.hf_config.num_experts={args.experts}",
                f"model.hf_config.hidden_size={args.hidden}",
                f"model.hf_config.moe_intermediate_size={args.expert_ffn}",
            ]
            rows = {
                "full fine-tuning": run(base, Path(tmp) / "full", args.warmup),
                "masked, lean experts (default)": run([*base, masked_option], Path(tmp) / "lean", args.warmup),
                "masked, mask only (lean=false)": run(
                    [*base, masked_option, "+callbacks.trainable.lean=false"], Path(tmp) / "mask", args.warmup
                ),
            }
        for name, r in rows.items():
            print(
                f"| {zero} | {name} | {r['state_bytes'] / 2**20:.2f} | {r['with_grad']:,} / {r['total']:,} | "
                f"{r['trained']:,} | {r['step_s'] * 1e3:.0f} |"
            )
        full = rows["full fine-tuning"]
        for name in list(rows)[1:]:
            r = rows[name]
            ratios.append(
                f"ZeRO {zero}, {name} / full: AdamW state {r['state_bytes'] / full['state_bytes']:.2f}, "
                f"elements trained {r['trained'] / full['trained']:.2f}, step time {r['step_s'] / full['step_s']:.2f}"
            )
    print()
    print("\n".join(ratios))


if __name__ == "__main__":
    main()
