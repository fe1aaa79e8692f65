"""``connito analyze``: stream held-out text through a model, measure its routing, scan for driver experts, and
write ``analysis.json``, ``report.md`` and pictures.

One process (CPU or one GPU), or data parallel under ``torchrun`` (``all_ranks``: each rank streams every
``world``-th row and the sums are added over the ranks; rank 0 writes). The model is a ``save_pretrained``
directory or a ``connito train`` run directory; the text is prepared with the model's own tokenizer when it ships
one, so the rows are what the model was trained to read. Rows are taken evenly spread over the split (packed rows
follow documents, so the first rows would all come from a few documents).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from connito.analysis.config import AnalysisOptions, AnalyzeConfig
from connito.analysis.drivers import DriverScores, check_factors, driver_scan
from connito.analysis.report import write_outputs
from connito.analysis.reweighting import MODES, Reweighting, fold_refusal
from connito.analysis.reweighting_effect import (
    TARGETS,
    ReweightingEffect,
    boost_targets,
    export_reweighted,
    reweighting_effect,
)
from connito.analysis.statistics import RoutingStatistics
from connito.analysis.sufficiency import Sufficiency, single_expert_sufficiency
from connito.analysis.summaries import RoutingSummary, summarise
from connito.data.config import DataConfig
from connito.experts import ExpertView
from connito.models.families import ModelError
from connito.models.fingerprint import checkpoint_fingerprint
from connito.routing import RouterObserver

log = logging.getLogger("connito.analysis")


@dataclass
class AnalysisResult:
    out_dir: Path
    model_path: Path
    fingerprint: str
    summary: RoutingSummary
    drivers: DriverScores | None
    sufficiency: Sufficiency | None = None
    reweighting: ReweightingEffect | None = None
    exports: dict[str, Path] = field(default_factory=dict)
    """Folded reweighted checkpoints by domain (``reweighting.export=true``)."""


def resolve_model_path(model_path: str) -> Path:
    """A checkpoint directory, or a ``connito train`` run directory (its ``hf/`` export)."""
    from connito.models.default_paths import HINT, default_checkpoint

    path = Path(model_path).expanduser() if model_path else default_checkpoint()
    if (path / "hf" / "config.json").is_file():
        path = path / "hf"
    if not (path / "config.json").is_file():
        hint = f" No model_path given: {HINT}." if not model_path else ""
        raise ModelError(
            f"model_path='{path}' is neither a save_pretrained checkpoint nor a connito run directory with an hf/ "
            f"export.{hint} Set model_path=<checkpoint or run directory>"
        )
    return path


def default_out_dir(model_path: Path) -> Path:
    """``<run>/analysis`` for the ``hf/`` export of a ``connito train`` run, else ``<model_path>/analysis``."""
    if model_path.name == "hf" and (model_path.parent / "metrics.jsonl").is_file():
        return model_path.parent / "analysis"
    return model_path / "analysis"


def check_options(cfg: AnalysisOptions) -> None:
    """Refuse options no measurement can use, before anything is loaded."""
    if cfg.tokens < 1 or cfg.batch_size < 1:
        raise ValueError(f"tokens={cfg.tokens} and batch_size={cfg.batch_size} must be positive")
    if cfg.drivers.enabled:
        check_factors(cfg.drivers.factor_up, cfg.drivers.factor_down)
        if cfg.drivers.tokens < 1 or cfg.drivers.experts_per_forward < 1:
            raise ValueError(
                f"drivers.tokens={cfg.drivers.tokens} and drivers.experts_per_forward="
                f"{cfg.drivers.experts_per_forward} must be positive"
            )
    rw = cfg.reweighting
    if rw.enabled:
        if rw.mode not in MODES:
            raise ValueError(f"reweighting.mode must be one of {', '.join(MODES)}, got '{rw.mode}'")
        if not (rw.factor > 0 and rw.factor != float("inf")):
            raise ValueError(f"reweighting.factor must be finite and > 0 (1 changes nothing), got {rw.factor}")
        if not rw.targets or any(t not in TARGETS for t in rw.targets):
            raise ValueError(f"reweighting.targets must be a non-empty list of {', '.join(TARGETS)}, got {rw.targets}")
        if "drivers" in rw.targets and not cfg.drivers.enabled:
            raise ValueError(
                "reweighting.targets includes 'drivers' but drivers.enabled=false: turn the scan on, or set "
                "reweighting.targets=[domain_experts]"
            )
        if rw.drivers_per_domain < 1:
            raise ValueError(f"reweighting.drivers_per_domain must be >= 1, got {rw.drivers_per_domain}")


def _rows(split_len: int, seq_len: int, tokens: int) -> list[int]:
    count = min(split_len, max(1, -(-tokens // seq_len)))
    return torch.linspace(0, split_len - 1, count).round().long().unique().tolist()


def run_analysis(cfg: AnalyzeConfig, *, use_model_tokenizer: bool = True, all_ranks: bool = False) -> AnalysisResult:
    """Analyse ``cfg.model_path`` on ``cfg.data`` and write the outputs (see the module docstring).

    ``use_model_tokenizer``: when ``cfg.data.tokenizer_path`` is empty and the checkpoint ships a tokenizer,
    prepare the data with it (so the rows are what the model reads); False keeps ``cfg.data`` as given (the report
    of a training run, whose data config already names the model's tokenizer or the recipe's trained one).

    ``all_ranks``: data parallel over the initialised process group (a collective): rank 0 prepares the data,
    every rank streams every ``world``-th row, the sums are added over the ranks, and rank 0 writes the outputs."""
    from transformers import AutoModelForCausalLM

    from connito.data import prepare_data
    from connito.data.packed import PackedSplit
    from connito.models.loading import has_tokenizer, validate_checkpoint_dir
    from connito.training.collective import barrier

    rank, world = (dist.get_rank(), dist.get_world_size()) if all_ranks else (0, 1)
    check_options(cfg)
    model_path = resolve_model_path(cfg.model_path)
    validate_checkpoint_dir(model_path)
    out_dir = Path(cfg.out_dir).expanduser() if cfg.out_dir else default_out_dir(model_path)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    model = AutoModelForCausalLM.from_pretrained(model_path, local_files_only=True, dtype=torch.float32)
    model = model.to(device).eval()
    view = ExpertView(model)  # a dense model stops here: it has no experts to analyse
    if cfg.reweighting.enabled and cfg.reweighting.export:
        # any boost touching every MoE layer: refused exactly when some domain's boost would be
        probe = Reweighting({(layer, 0): 2.0 for layer in view.moe_layers}, cfg.reweighting.mode)
        reason = fold_refusal(view, probe)
        if reason is not None:
            raise ValueError(f"reweighting.export=true cannot be written for this model. {reason}")
    fingerprint = checkpoint_fingerprint(model_path)

    data = cfg.data  # the caller's config is never changed: a new one where the checkpoint's tokenizer applies
    if use_model_tokenizer and not data.tokenizer_path and has_tokenizer(model_path):
        data = dataclasses.replace(data, tokenizer_path=str(model_path))
    if rank == 0:
        prepared = prepare_data(data, progress=cfg.progress)
    if all_ranks:
        barrier()
    if rank != 0:
        prepared = prepare_data(data, progress=False)
    if len(prepared.load_tokenizer()) > model.config.vocab_size:
        raise ModelError(
            f"the data's tokenizer has more tokens than the model's vocabulary ({model.config.vocab_size}); set "
            "data.tokenizer_path to the model's tokenizer"
        )
    split = PackedSplit.from_dataset(prepared.load_split(cfg.split))
    seq_len = split.input_ids_NT.shape[1]
    progress = cfg.progress and rank == 0
    num_domains = len(prepared.domains)

    def my_batches(tokens: int, what: str) -> list[list[int]]:
        rows = _rows(len(split), seq_len, tokens)
        if len(rows) < world:
            raise ValueError(
                f"{what}: {len(rows)} rows of {seq_len} tokens for {world} ranks; raise the token count or use "
                "fewer ranks"
            )
        mine = rows[rank::world]
        return [mine[i : i + cfg.batch_size] for i in range(0, len(mine), cfg.batch_size)]

    stats = RoutingStatistics(view, num_domains, prepared.domains)
    observer = RouterObserver(model, view)
    subscription = stats.attach(observer)
    with torch.no_grad():
        for index in tqdm(
            my_batches(cfg.tokens, "tokens"), desc="routing statistics", unit="batch", disable=not progress
        ):
            stats.set_domains(split.domain_ids_NT[index].reshape(-1))
            model(input_ids=split.input_ids_NT[index].to(device))
    subscription.remove()
    observer.close()
    if all_ranks:
        stats.all_reduce_()
    summary = summarise(stats, min_tokens=cfg.min_tokens, specialisation_threshold=cfg.specialisation_threshold)

    scan_batches = my_batches(cfg.drivers.tokens, "drivers.tokens")
    scan_inputs = [split.input_ids_NT[index] for index in scan_batches]
    scan_domains = [split.domain_ids_NT[index] for index in scan_batches]
    measure = dict(num_domains=num_domains, view=view, progress=progress, all_ranks=all_ranks)
    drivers = None
    if cfg.drivers.enabled:
        drivers = driver_scan(
            model,
            scan_inputs,
            scan_domains,
            factor_up=cfg.drivers.factor_up,
            factor_down=cfg.drivers.factor_down,
            experts_per_forward=cfg.drivers.experts_per_forward,
            **measure,
        )
    sufficiency = None
    if cfg.sufficiency.enabled:
        sufficiency = single_expert_sufficiency(model, scan_inputs, scan_domains, **measure)
    effect, exports = None, {}
    if cfg.reweighting.enabled:
        rw = cfg.reweighting
        reweightings = [
            Reweighting(
                {i: rw.factor for i in boost_targets(d, rw.targets, summary, drivers, rw.drivers_per_domain)}
                if summary.usable_D[d]
                else {},
                rw.mode,
            )
            for d in range(num_domains)
        ]
        effect = reweighting_effect(model, scan_inputs, scan_domains, reweightings, **measure)
        if rw.export and rank == 0:
            for d, reweighting in enumerate(reweightings):
                if reweighting.boost:
                    name = prepared.domains[d]
                    exports[name] = export_reweighted(model, model_path, reweighting, out_dir / f"reweighted-{name}")
    result = AnalysisResult(out_dir, model_path, fingerprint, summary, drivers, sufficiency, effect, exports)
    if rank == 0:
        write_outputs(result, stats, view, cfg)
        log.info("analysis written to %s", out_dir)
    if all_ranks:
        barrier()
    return result


def analyze_run(options: AnalysisOptions, run_dir: Path, data: DataConfig) -> AnalysisResult:
    """The report ``connito train analysis=report`` writes after training: ``options`` on the run's ``hf/`` export,
    the run's own data (its validation split), into ``<run_dir>/analysis``."""
    fields = {f.name: copy.deepcopy(getattr(options, f.name)) for f in dataclasses.fields(AnalysisOptions)}
    cfg = AnalyzeConfig(
        **fields, model_path=str(run_dir / "hf"), data=copy.deepcopy(data), out_dir=str(run_dir / "analysis")
    )
    return run_analysis(cfg, use_model_tokenizer=False)
