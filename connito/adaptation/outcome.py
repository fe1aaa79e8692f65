"""What an adaptation run gained, forgot and cost: ``<run>/adapt.json`` and the table of ``connito adapt report``.

Measured on rank 0 once training finished:

* **validation loss** of the base and of the adapted model (the run's HF export; for DES-MoE with its trained
  adaptive routers loaded, and as plain transformers loads it, the folded routers, in ``adapted_plain``) on every
  evaluated domain
  (``outcome.eval_domains``; default the four recipe domains), the same held-out rows for both (rows spread evenly
  over the validation split of those domains, tokenized with the base's tokenizer). *Gain* is the mean loss drop
  on the adapted domains (``data.domains``), *forgetting* the mean loss change on the others (positive = worse);
* **trainable parameters**: elements of the whole model the optimizer may move at the end of the run (a gradient
  mask's trainable rows, else every ``requires_grad`` parameter; summed over the expert-parallel ranks);
* **optimizer-state bytes** of rank 0 (AdamW's moments: under ZeRO 1/2 a rank holds its partition only, under
  expert parallelism the state of its own experts);
* **step time**: seconds per optimizer step over the run (from the last ``train/tokens_per_s`` the run logged,
  warm-up included);
* **delta size**: bytes on disk of ``<run>/delta``, the expert delta package of every expert and module whose
  weights changed (:func:`connito.experts.delta.save_delta`; ``connito apply`` rebuilds the full checkpoint).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

log = logging.getLogger("connito.adaptation")

OUTCOME_FILE = "adapt.json"
SCHEMA = "connito.adaptation/1"


def optimizer_state_bytes(engine) -> int:
    """Bytes of every tensor in the inner torch optimizer's state on this rank."""
    from connito.training.optimizer_groups import inner_optimizer

    optimizer = inner_optimizer(engine)
    total = 0
    for state in getattr(optimizer, "state", {}).values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total


def trainable_elements(result) -> int:
    """Elements of the whole model the optimizer may move at the end of the run: the trainable rows of a gradient
    mask's parameters (:class:`connito.training.grad_masks.GradientMask`, held by a callback as ``mask``; DES-MoE's
    final phase), else every ``requires_grad`` parameter. Under expert parallelism each rank holds other experts:
    their counts are summed over the expert-parallel group (a collective: every rank calls it)."""
    import torch.distributed as dist

    from connito.parallel.expert_parallel import autoep_layers

    layers = list(autoep_layers(result.model).values())
    expert_ids = {id(p) for layer in layers for p in layer.experts.parameters()}
    counts = None
    for callback in getattr(result.trainer, "callbacks", []):
        masks = getattr(getattr(callback, "mask", None), "masks", None)
        if masks is not None:
            counts = [(id(m.param) in expert_ids, m.trainable_numel()) for m in masks]
            break
    if counts is None:
        counts = [(id(p) in expert_ids, p.numel()) for p in result.model.parameters() if p.requires_grad]
    dense = sum(n for is_expert, n in counts if not is_expert)
    experts = torch.tensor(float(sum(n for is_expert, n in counts if is_expert)), dtype=torch.float64)
    if layers and layers[0].ep_group is not None and dist.is_initialized():
        dist.all_reduce(experts, group=layers[0].ep_group)
    return dense + int(experts)


def step_seconds(run_dir: Path, tokens_per_step: int) -> float | None:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    speeds = [r["train/tokens_per_s"] for r in records if "train/tokens_per_s" in r]
    return tokens_per_step / speeds[-1] if speeds and speeds[-1] > 0 else None


def eval_batches(cfg, base: Path):
    """The held-out rows both models are measured on: (domains, inputs, domain ids)."""
    from connito.analysis.held_out import held_out_batches
    from connito.data.config import DEFAULT_DOMAINS

    held_out = held_out_batches(
        cfg.data,
        base,
        domains=list(cfg.outcome.eval_domains or DEFAULT_DOMAINS),
        eval_tokens=cfg.outcome.eval_tokens,
        micro_batch_size=cfg.train.micro_batch_size,
    )
    return held_out.domains, held_out.inputs, held_out.domain_ids


def method_label(cfg) -> str:
    """``full``, ``des_moe``, ``esft-gate`` / ``esft-token`` (selected on the training data) or ``esft-mask`` (a
    given mask file)."""
    if cfg.method != "esft":
        return cfg.method
    return "esft-mask" if cfg.esft.mask_file else f"esft-{cfg.esft.score}"


def measure_outcome(cfg, base: Path, result, trainable: int) -> dict:
    """Measure the finished run (see the module docstring), write ``adapt.json``, print the row; returns the record."""
    from transformers import AutoModelForCausalLM

    from connito.analysis.token_loss import domain_losses
    from connito.experts.delta import changed_experts, changed_modules, save_delta
    from connito.models.fingerprint import checkpoint_fingerprint

    run_dir = Path(result.run_dir)
    if result.export_dir is None:
        raise ValueError("connito adapt measures the run's HF export: keep train.export=true")
    load = dict(local_files_only=True, dtype=torch.float32)
    base_model = AutoModelForCausalLM.from_pretrained(base, **load).eval()
    adapted = AutoModelForCausalLM.from_pretrained(result.export_dir, **load).eval()
    domains, inputs, domain_ids = eval_batches(cfg, base)
    _, base_loss = domain_losses(base_model, inputs, domain_ids, len(domains))
    tokens, plain_loss = domain_losses(adapted, inputs, domain_ids, len(domains))
    adapted_loss, router = plain_loss, "the family's (plain transformers)"
    from connito.adaptation.des_moe.export import MANIFEST, load_adaptive_router

    if (result.export_dir / MANIFEST).is_file():  # DES-MoE: measure the trained adaptive routers, not their fold
        routers = load_adaptive_router(adapted, result.export_dir)
        _, adapted_loss = domain_losses(adapted, inputs, domain_ids, len(domains))
        routers.remove()
        router = f"DES-MoE's adaptive routers ({MANIFEST}); plain transformers' folded routers in adapted_plain"
    adapted_domains = [d for d in cfg.data.domains if d in domains] if cfg.data.source == "recipe" else []
    loss = {
        d: {
            "tokens": int(tokens[i]),
            "base": float(base_loss[i]),
            "adapted": float(adapted_loss[i]),
            "adapted_plain": float(plain_loss[i]),
        }
        for i, d in enumerate(domains)
    }
    change = {d: v["adapted"] - v["base"] for d, v in loss.items()}
    others = [d for d in domains if d not in adapted_domains]
    mean = lambda names: sum(change[d] for d in names) / len(names) if names else None  # noqa: E731

    delta_dir, delta_bytes = None, None
    if cfg.outcome.save_delta:
        experts = changed_experts(adapted, base_model)
        modules = changed_modules(adapted, base_model)
        if len(experts) or modules:
            delta_dir = run_dir / "delta"
            save_delta(adapted, base, delta_dir, experts=experts, modules=modules, overwrite=True)
            delta_bytes = sum(f.stat().st_size for f in delta_dir.iterdir() if f.is_file())

    record = {
        "schema": SCHEMA,
        "method": method_label(cfg),
        "base": {"path": str(base), "fingerprint": checkpoint_fingerprint(base)},
        "adapted_domains": adapted_domains,
        "loss": loss,
        "router": router,
        "gain": None if mean(adapted_domains) is None else -mean(adapted_domains),
        "forgetting": mean(others),
        "trainable_params": trainable,
        "total_params": sum(p.numel() for p in base_model.parameters()),
        "optimizer_state_bytes": optimizer_state_bytes(result.engine),
        "step_seconds": step_seconds(run_dir, result.trainer.tokens_per_step),
        "steps": result.steps_done,
        "delta": None if delta_dir is None else {"path": str(delta_dir), "bytes": delta_bytes},
    }
    tmp = run_dir / f".{OUTCOME_FILE}.tmp"
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(run_dir / OUTCOME_FILE)
    print(outcome_table([record]))
    return record


def outcome_table(records: list[dict]) -> str:
    """The markdown table of one or more ``adapt.json`` records (one row each)."""
    lines = [
        "| method | in-domain gain (nats) | forgetting (nats, other domains) | trainable params | optimizer state "
        "| step time | delta on disk |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in records:
        share = r["trainable_params"] / r["total_params"]
        step = f"{r['step_seconds'] * 1000:.0f} ms" if r["step_seconds"] else "-"
        delta = f"{r['delta']['bytes'] / 2**20:.2f} MiB" if r["delta"] else "none"
        gain = "-" if r["gain"] is None else f"{r['gain']:+.4f}"
        forgetting = "-" if r["forgetting"] is None else f"{r['forgetting']:+.4f}"
        lines.append(
            f"| {r['method']} | {gain} | {forgetting} | {r['trainable_params']:,} ({share:.1%}) | "
            f"{r['optimizer_state_bytes'] / 2**20:.2f} MiB | {step} | {delta} |"
        )
    return "\n".join(lines)


def read_outcomes(paths: list[str | Path]) -> list[dict]:
    """The ``adapt.json`` records of run directories (or the files themselves), in the order given."""
    records = []
    for path in paths:
        file = Path(path).expanduser()
        file = file / OUTCOME_FILE if file.is_dir() else file
        if not file.is_file():
            raise FileNotFoundError(f"no {OUTCOME_FILE} at {file}: is it a finished `connito adapt` run directory?")
        record = json.loads(file.read_text())
        if record.get("schema") != SCHEMA:
            raise ValueError(f"{file} is not a {SCHEMA} record (schema {record.get('schema')!r})")
        records.append(record)
    return records
