"""Parameters (total, active per token) of composed checkpoints and the training speed of the jobs that made them:
the cost columns of the composition experiment in docs/compose.md (launch/compose_experiment.sh). Speeds compare only
between jobs with the same tokens per step on the same, otherwise idle machine.

    python launch/compose_costs.py btx=runs/compose-btx bam=runs/compose-bam dense=runs/compose-btx/dense

Each ``name=dir``: a ``connito btx`` run directory (its ``finetune`` job and ``merged`` checkpoint are read) or a
``connito train`` run directory (its ``hf`` export and metrics). Active parameters per token: every parameter a token
runs through; routed FFN experts count k / E of their parameters (top-k of E), soft-routed attention experts (BAM)
and BTS's hub, branches and stitches count whole (every token runs all of them).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch


def _model_dir(run: Path) -> Path:
    for candidate in (run / "finetune" / "hf", run / "hf", run / "merged"):
        if (candidate / "config.json").is_file():
            return candidate
    raise SystemExit(f"compose_costs: no checkpoint under {run} (finetune/hf, hf or merged)")


def _metrics(run: Path) -> Path | None:
    for candidate in (run / "finetune" / "metrics.jsonl", run / "metrics.jsonl"):
        if candidate.is_file():
            return candidate
    return None


def parameter_counts(path: Path) -> tuple[int, int]:
    """(total, active per token) of the checkpoint at ``path``."""
    from transformers import AutoModelForCausalLM

    import connito.models.loading  # noqa: F401  (registers Connito's own model classes)
    from connito.experts import ExpertView

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    total = sum(p.numel() for p in model.parameters())
    try:
        view = ExpertView(model)
    except ValueError:  # dense (a seed, a branch, a BTS model): every parameter is active
        return total, total
    routed = sum(piece.param.numel() for piece in view.expert_param_slices())
    return total, total - routed + routed * view.top_k // view.num_experts


def training_speed(run: Path) -> float | None:
    """Median tokens/s of the run's training job (the fine-tuning job of a pipeline), its first record left out."""
    metrics = _metrics(run)
    if metrics is None:
        return None
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    rates = [r["train/tokens_per_s"] for r in records if "train/tokens_per_s" in r][1:]
    return statistics.median(rates) if rates else None


def main(pairs: list[str]) -> None:
    """One table row per ``name=dir``; step time relative to the first row's (same tokens per step)."""
    print("| model | parameters | active per token | training tokens/s | step time vs first row |")
    print("|---|---|---|---|---|")
    first = None
    for pair in pairs:
        name, _, directory = pair.partition("=")
        run = Path(directory)
        total, active = parameter_counts(_model_dir(run))
        rate = training_speed(run)
        first = first or rate
        speed = f"{rate:,.0f}" if rate else "-"
        ratio = f"{first / rate:.2f}x" if rate and first else "-"
        print(f"| {name} | {total:,} | {active:,} ({100 * active / total:.0f}%) | {speed} | {ratio} |")


if __name__ == "__main__":
    if len(sys.argv) < 2 or any("=" not in a for a in sys.argv[1:]):
        raise SystemExit(__doc__)
    main(sys.argv[1:])
