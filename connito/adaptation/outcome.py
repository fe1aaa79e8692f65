"""What an adaptation run gained, forgot and cost: ``<run>/adapt.json`` and the table of ``connito adapt report``.

Measured on rank 0 once training finished:

* **validation loss** of the base and of the adapted model (the run's HF export; for DES-MoE with its trained
  adaptive routers loaded, and as plain transformers loads it, the folded routers, in ``adapted_plain``) on every
  evaluated domain
  (``outcome.eval_domains``; default the four recipe domains; for ``data.source=files`` the files' domains plus
  those), the same held-out rows for both (rows spread evenly over the validation split of those domains, tokenized
  with the base's tokenizer). *Gain* is the mean loss drop on the adapted domains (``outcome.adapted_domains``,
  default the training data's domains: :func:`adapted_domains`), *forgetting* the mean loss change on the others
  (positive = worse; none measured: ``null``);
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

import copy
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from connito.common.atomic import atomic_write_json
from connito.common.records import read_json_record

log = logging.getLogger("connito.adaptation")

OUTCOME_FILE = "adapt.json"
SCHEMA = "connito.adaptation/1"


class OutcomeError(ValueError):
    """An ``adapt.json`` Connito cannot read; the message names the file and the fix."""


@dataclass(frozen=True)
class AdaptOutcome:
    """One ``adapt.json`` (schema ``connito.adaptation/1``): what an adaptation run gained, forgot and cost. The
    fields are the file's keys, in its order (see the module docstring for what each measures)."""

    method: str
    base: Mapping[str, str]
    """``path`` and ``fingerprint`` of the base checkpoint."""
    adapted_domains: list[str]
    loss: Mapping[str, Mapping[str, Any]]
    """Per measured domain: ``tokens``, ``base``, ``adapted``, ``adapted_plain`` (nats)."""
    router: str
    gain: float | None
    forgetting: float | None
    trainable_params: int
    total_params: int
    optimizer_state_bytes: int
    step_seconds: float | None
    steps: int
    delta: Mapping[str, Any] | None
    """None, or the delta package's ``path`` and ``bytes``."""
    path: Path | None = field(default=None, compare=False)
    """Where it was read from (None: measured in this process)."""

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, **{f.name: getattr(self, f.name) for f in fields(self) if f.name != "path"}}

    @classmethod
    def from_dict(cls, record: Mapping, path: str | Path | None = None) -> AdaptOutcome:
        names = [f.name for f in fields(cls) if f.name != "path"]
        missing = [name for name in names if name not in record]
        if missing:
            where = path if path is not None else "the adaptation record"
            raise OutcomeError(f"{where} lacks {missing}: measure the run again with `connito adapt`")
        return cls(**{name: record[name] for name in names}, path=None if path is None else Path(path))

    @classmethod
    def load(cls, path: str | Path) -> AdaptOutcome:
        """The ``adapt.json`` at ``path`` (the file or its run directory), schema and version checked."""
        file = Path(path).expanduser()
        file = file / OUTCOME_FILE if file.is_dir() else file
        if not file.is_file():
            raise FileNotFoundError(f"no {OUTCOME_FILE} at {file}: is it a finished `connito adapt` run directory?")
        fix = "point at the adapt.json of a `connito adapt` run (or its run directory)"
        return cls.from_dict(read_json_record(file, SCHEMA, what="Connito adaptation record", fix=fix,
                                              error=OutcomeError), file)  # fmt: skip

    def save(self, path: str | Path) -> Path:
        """Write the record to ``path`` (a file path) atomically."""
        return atomic_write_json(Path(path).expanduser(), self.to_dict())


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


def adapted_domains(cfg, training_domains: list[str]) -> list[str]:
    """The domains the run adapts to, on which the gain is measured: ``outcome.adapted_domains`` when given, else
    the training data's (the recipe's ``data.domains``; for ``data.source=files`` the files' domains)."""
    return list(cfg.outcome.adapted_domains or training_domains)


def eval_sets(cfg, base: Path, adapted: list[str]) -> list[tuple[list[str], list, list]]:
    """The held-out rows both models are measured on, as ``(domains, inputs, domain ids)`` sets.

    Recipe data: one set over ``outcome.eval_domains`` (default the four recipe domains), the adapted ones added.
    ``data.source=files``: the files' own validation split (the adapted domains' gain), then the recipe's
    ``outcome.eval_domains`` under names the files do not use (the base's other domains, for forgetting), where the
    recipe can be read on this machine (a warning and no forgetting where it cannot)."""
    from connito.analysis.held_out import held_out_batches
    from connito.data import DataError
    from connito.data.config import DEFAULT_DOMAINS

    options = dict(eval_tokens=cfg.outcome.eval_tokens, micro_batch_size=cfg.train.micro_batch_size)
    others = [d for d in (cfg.outcome.eval_domains or DEFAULT_DOMAINS) if d not in adapted]
    if cfg.data.source == "recipe":
        held = held_out_batches(cfg.data, base, domains=list(dict.fromkeys(adapted + others)), **options)
        return [(held.domains, held.inputs, held.domain_ids)]
    own = held_out_batches(cfg.data, base, **options)
    sets = [(own.domains, own.inputs, own.domain_ids)]
    others = [d for d in others if d not in own.domains]
    if others:
        recipe = copy.deepcopy(cfg.data)
        recipe.source, recipe.domains = "recipe", others
        try:
            held = held_out_batches(recipe, base, domains=others, **options)
        except DataError as error:
            log.warning("forgetting not measured: the recipe domains %s cannot be read here (%s)", others, error)
        else:
            sets.append((held.domains, held.inputs, held.domain_ids))
    return sets


def domain_loss_table(model, sets) -> tuple[dict[str, int], dict[str, float]]:
    """``(tokens, loss)`` by domain name over every held-out set."""
    from connito.analysis.token_loss import domain_losses

    tokens, loss = {}, {}
    for domains, inputs, domain_ids in sets:
        tokens_D, loss_D = domain_losses(model, inputs, domain_ids, len(domains))
        for i, name in enumerate(domains):
            tokens[name], loss[name] = int(tokens_D[i]), float(loss_D[i])
    return tokens, loss


def method_label(cfg) -> str:
    """``full``, ``des_moe`` (``des_moe I=router`` when phase I trains other parts than the default's),
    ``esft-gate`` / ``esft-token`` (selected on the training data) or ``esft-mask`` (a given mask file)."""
    if cfg.method == "des_moe":
        from connito.adaptation.des_moe.config import DEFAULT_PHASE_PARTS

        parts = (cfg.callbacks.get("des_moe") or {}).get("phase_parts")
        if parts is None or [list(p) for p in parts] == DEFAULT_PHASE_PARTS:
            return "des_moe"
        first = [parts[0]] if isinstance(parts[0], str) else list(parts[0])
        return f"des_moe I={'+'.join(first)}"
    if cfg.method != "esft":
        return cfg.method
    return "esft-mask" if cfg.esft.mask_file else f"esft-{cfg.esft.score}"


def measure_outcome(cfg, base: Path, result, trainable: int) -> AdaptOutcome:
    """Measure the finished run (see the module docstring), write ``adapt.json``, print the row; returns the record."""
    from transformers import AutoModelForCausalLM

    from connito.experts.delta import changed_experts, changed_modules, save_delta
    from connito.models.fingerprint import checkpoint_fingerprint

    run_dir = Path(result.run_dir)
    if result.export_dir is None:
        raise ValueError("connito adapt measures the run's HF export: keep train.export=true")
    load = dict(local_files_only=True, dtype=torch.float32)
    base_model = AutoModelForCausalLM.from_pretrained(base, **load).eval()
    adapted = AutoModelForCausalLM.from_pretrained(result.export_dir, **load).eval()
    wanted = adapted_domains(cfg, list(result.trainer.prepared.domains))
    sets = eval_sets(cfg, base, wanted)
    _, base_loss = domain_loss_table(base_model, sets)
    tokens, plain_loss = domain_loss_table(adapted, sets)
    missing = [d for d in wanted if d not in tokens]
    if missing:
        raise ValueError(
            f"outcome.adapted_domains {missing} are not among the measured domains {sorted(tokens)}: name domains of "
            "the training data (or of outcome.eval_domains)"
        )
    adapted_loss, router = plain_loss, "the family's (plain transformers)"
    from connito.adaptation.des_moe.export import MANIFEST, load_adaptive_router

    if (result.export_dir / MANIFEST).is_file():  # DES-MoE: measure the trained adaptive routers, not their fold
        routers = load_adaptive_router(adapted, result.export_dir)
        _, adapted_loss = domain_loss_table(adapted, sets)
        routers.remove()
        router = f"DES-MoE's adaptive routers ({MANIFEST}); plain transformers' folded routers in adapted_plain"
    domains = list(tokens)
    loss = {
        d: {"tokens": tokens[d], "base": base_loss[d], "adapted": adapted_loss[d], "adapted_plain": plain_loss[d]}
        for d in domains
    }
    change = {d: v["adapted"] - v["base"] for d, v in loss.items()}
    others = [d for d in domains if d not in wanted]
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
        "method": method_label(cfg),
        "base": {"path": str(base), "fingerprint": checkpoint_fingerprint(base)},
        "adapted_domains": wanted,
        "loss": loss,
        "router": router,
        "gain": None if mean(wanted) is None else -mean(wanted),
        "forgetting": mean(others),
        "trainable_params": trainable,
        "total_params": sum(p.numel() for p in base_model.parameters()),
        "optimizer_state_bytes": optimizer_state_bytes(result.engine),
        "step_seconds": step_seconds(run_dir, result.trainer.tokens_per_step),
        "steps": result.steps_done,
        "delta": None if delta_dir is None else {"path": str(delta_dir), "bytes": delta_bytes},
    }
    outcome = AdaptOutcome.from_dict(record)
    outcome.save(run_dir / OUTCOME_FILE)
    print(outcome_table([outcome]))
    return outcome


def outcome_table(records: list[AdaptOutcome]) -> str:
    """The markdown table of one or more ``adapt.json`` records (one row each)."""
    lines = [
        "| method | in-domain gain (nats) | forgetting (nats, other domains) | trainable params | optimizer state "
        "| step time | delta on disk |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in records:
        share = r.trainable_params / r.total_params
        step = f"{r.step_seconds * 1000:.0f} ms" if r.step_seconds else "-"
        delta = f"{r.delta['bytes'] / 2**20:.2f} MiB" if r.delta else "none"
        gain = "-" if r.gain is None else f"{r.gain:+.4f}"
        forgetting = "-" if r.forgetting is None else f"{r.forgetting:+.4f}"
        lines.append(
            f"| {r.method} | {gain} | {forgetting} | {r.trainable_params:,} ({share:.1%}) | "
            f"{r.optimizer_state_bytes / 2**20:.2f} MiB | {step} | {delta} |"
        )
    return "\n".join(lines)


def read_outcomes(paths: list[str | Path]) -> list[AdaptOutcome]:
    """The ``adapt.json`` records of run directories (or the files themselves), in the order given."""
    return [AdaptOutcome.load(path) for path in paths]
