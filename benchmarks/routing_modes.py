"""Top-k against Expert Choice and expert-threshold routing at the same compute, on one tiny model and its data.

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 .venv/bin/python benchmarks/routing_modes.py            # ~5 min, 1 thread
    DS_ACCELERATOR=cpu .venv/bin/python benchmarks/routing_modes.py --steps 40 --eval-rows 16    # smoke run

Three runs of `connito train` (the one trainer, in this process) with the same model config (``qwen3_moe_tiny``:
4 MoE layers x 8 experts, top-2), data (the bundled recipe), seed, optimizer and steps; the routing differs, and
with it the balancing term that fits it (``--balance fitted``, the default: top-k the family's load-balancing loss,
0.01; Expert Choice and expert thresholds none, as they balance by construction) or no balancing term for any
(``--balance none``):

* ``top-k``: the family's own routing (each token its 2 best experts);
* ``expert_choice``: ``+callbacks.expert_choice.capacity_factor=1.0`` (each expert its C = T x 2 / 8 best tokens of
  the micro-batch; the route predictor trained beside it);
* ``expert_threshold``: ``+callbacks.expert_threshold.capacity_factor=1.0`` (moving per-expert thresholds).

At capacity factor 1 every mode runs T x 2 expert-token products per forward in training (Expert Choice exactly,
threshold routing on average). Held-out loss (nats/token) is measured on the same validation rows for every row of
the table, in eval mode, and the table gives the experts per token each route actually used there:

* Expert Choice's deployable number is its **causal** route (the predictor: ``calibrated``, the run's own
  validation route; ``top_k``, each token its 2 best predicted experts; ``half``, Mixture-of-Depths' reading). Its
  leaky training route evaluated on whole held-out batches is shown as a reference only: it sees later tokens.
* ``export loaded top-k``: the run's HF export as plain transformers routes it (top-k), the cost of loading a
  routing-mode checkpoint without Connito's loader.

The last column is the mean wall time of a training step after the first five (these CPUs are noisy; the modes'
expert computations are Connito's plain-torch code, top-k runs transformers' grouped_mm).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from connito.training.callbacks import Callback  # noqa: E402

MODES = {
    "top-k": [],
    "expert_choice": ["+callbacks.expert_choice.capacity_factor=1.0"],
    "expert_threshold": ["+callbacks.expert_threshold.capacity_factor=1.0"],
}
BALANCE = {
    # each route its own balancing: top-k the family's Switch loss on the top-k it routes by; Expert Choice (every
    # expert takes exactly C tokens) and expert thresholds (capacity quantiles) balance by construction, and a top-k
    # loss would push on a route they do not use
    "fitted": {"top-k": 0.01, "expert_choice": 0.0, "expert_threshold": 0.0},
    "none": {"top-k": 0.0, "expert_choice": 0.0, "expert_threshold": 0.0},
}


class StepTimer(Callback):
    """The wall time of every optimizer step."""

    def __init__(self):
        self.name = "step_timer"
        self.times: list[float] = []
        self.last = time.perf_counter()

    def on_step_end(self, trainer, losses) -> None:
        now = time.perf_counter()
        self.times.append(now - self.last)
        self.last = now

    def mean(self, skip: int = 5) -> float:
        kept = self.times[skip:] or self.times
        return sum(kept) / len(kept)


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from connito.cli import schema  # noqa: F401  (registers the typed configs)
    from connito.cli.paths import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return OmegaConf.to_object(hydra_compose(config_name="train", overrides=overrides))


@torch.no_grad()
def held_out(model, rows_NS: torch.Tensor, micro_batch: int, routing=None) -> tuple[float, float]:
    """(mean next-token loss, mean experts per token over MoE layers) of ``model`` in eval mode on ``rows_NS``."""
    from connito.training.losses import token_cross_entropy

    model.eval()
    loss_sum, count, experts = 0.0, 0, []
    for start in range(0, len(rows_NS), micro_batch):
        batch = rows_NS[start : start + micro_batch]
        losses = token_cross_entropy(model(input_ids=batch).logits, batch)
        loss_sum, count = loss_sum + losses.sum().item(), count + losses.numel()
        if routing is not None:
            experts += [r.last_mask_TE.sum(dim=1).float().mean().item() for r in routing.modules.values()]
    top_k = float(model.config.num_experts_per_tok)
    return loss_sum / count, (sum(experts) / len(experts) if experts else top_k)


def evaluate_run(mode: str, result, rows_NS: torch.Tensor, micro_batch: int, step_s: float) -> list[tuple]:
    """The table rows of one trained run: its held-out loss on every route worth comparing."""
    from transformers import AutoModelForCausalLM

    callback = next((c for c in result.trainer.callbacks if c.name == mode), None)
    routing = callback.routing if callback is not None else None
    table = []

    def row(route: str, model=result.model, routed=routing) -> None:
        table.append((mode, route, *held_out(model, rows_NS, micro_batch, routed), step_s))

    if routing is None:
        row("top-k (causal)")
        return table
    if mode == "expert_choice":
        row("predictor, calibrated (causal)")
        routing.set_predictor_inference("top_k")
        row("predictor, top-2 per token (causal)")
        routing.set_predictor_inference("half")
        row("predictor, p > 0.5 (causal)")
        routing.set_predictor_inference("calibrated")
        routing.set_eval_route("expert_choice")
        row("expert choice on whole batches (leaks the future)")
        routing.set_eval_route("predictor")
    else:
        row("thresholds (causal)")
    row("export loaded top-k by plain transformers", AutoModelForCausalLM.from_pretrained(result.export_dir), None)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--max-chars", type=int, default=400_000, help="characters per domain of the recipe")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--eval-rows", type=int, default=64, help="held-out rows (evenly spread over the split)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="run directory (default: a temporary one)")
    parser.add_argument("--balance", choices=sorted(BALANCE), default="fitted", help="balancing term per route")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from connito.training.trainer import run_training

    out = args.out or Path(tempfile.mkdtemp(prefix="routing-modes-"))
    common = [
        f"train.steps={args.steps}", f"train.micro_batch_size={args.micro_batch}", f"train.seed={args.seed}",
        "train.eval_every=0", f"train.checkpoint_every={args.steps}", "train.log_every=50", "analysis=none",
        "logging.wandb=false", "logging.progress=false", "train.eval_batches=8", f"data.seq_len={args.seq_len}",
        f"data.vocab_size={args.vocab}", f"data.max_chars_per_domain={args.max_chars}",
    ]  # fmt: skip
    rows, table = None, []
    for mode, extra in MODES.items():
        timer = StepTimer()
        balance = [f"model.aux_loss_coef={BALANCE[args.balance][mode]}"]
        result = run_training(
            compose(common + extra + balance + [f"run.name={mode}", f"run.root={out}"]), out / mode, callbacks=[timer]
        )
        step_s = timer.mean()
        if rows is None:
            split = result.trainer.val_split.input_ids_NT
            picks = torch.linspace(0, len(split) - 1, min(args.eval_rows, len(split))).round().long()
            rows = split[picks]
        table += evaluate_run(mode, result, rows, args.micro_batch, step_s)
        (out / f"{mode}.json").write_text(json.dumps({"validation": result.validation}, indent=1))

    tokens = rows.numel()
    shape = f"{args.steps} steps x {args.micro_batch} rows x {args.seq_len} tokens"
    held = f"held-out: {len(rows)} rows, {tokens} tokens"
    coefs = ", ".join(f"{mode} {coef:g}" for mode, coef in BALANCE[args.balance].items())
    print(f"\nqwen3_moe_tiny (4 MoE layers x 8 experts, top-2), vocab {args.vocab}, {shape}; {held}")
    print(f"balancing ({args.balance}): model.aux_loss_coef {coefs}\n")
    print("| training routing | held-out route | held-out loss | experts / token | s / training step |")
    print("|---|---|---|---|---|")
    for mode, route, loss, experts, step_s in table:
        print(f"| {mode} | {route} | {loss:.4f} | {experts:.2f} | {step_s:.3f} |")
    print(f"\nruns: {out}")


if __name__ == "__main__":
    main()
