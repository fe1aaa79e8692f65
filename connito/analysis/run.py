"""``connito analyze``: stream held-out text through a model, measure its routing, scan for driver experts, and
write ``analysis.json``, ``report.md`` and pictures.

One process (CPU or one GPU). The model is a ``save_pretrained`` directory or a ``connito train`` run directory;
the text is prepared with the model's own tokenizer when it ships one, so the rows are what the model was trained
to read. Rows are taken evenly spread over the split (packed rows follow documents, so the first rows would all
come from a few documents).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from connito.analysis.config import AnalyzeConfig
from connito.analysis.drivers import DriverScores, check_factors, driver_scan
from connito.analysis.report import write_outputs
from connito.analysis.statistics import RoutingStatistics
from connito.analysis.summaries import RoutingSummary, summarise
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


def resolve_model_path(model_path: str) -> Path:
    """A checkpoint directory, or a ``connito train`` run directory (its ``hf/`` export)."""
    path = Path(model_path or "runs/quickstart/hf").expanduser()
    if (path / "hf" / "config.json").is_file():
        path = path / "hf"
    if not (path / "config.json").is_file():
        hint = " Run `connito train` first (the quickstart writes runs/quickstart/hf)." if not model_path else ""
        raise ModelError(
            f"model_path='{path}' is neither a save_pretrained checkpoint nor a connito run directory with an hf/ "
            f"export.{hint} Set model_path=<checkpoint or run directory>"
        )
    return path


def _rows(split_len: int, seq_len: int, tokens: int) -> list[int]:
    count = min(split_len, max(1, -(-tokens // seq_len)))
    return torch.linspace(0, split_len - 1, count).round().long().unique().tolist()


def run_analysis(cfg: AnalyzeConfig) -> AnalysisResult:
    from transformers import AutoModelForCausalLM

    from connito.data import prepare_data
    from connito.models.loading import has_tokenizer, validate_checkpoint_dir
    from connito.training.batches import PackedSplit

    if cfg.tokens < 1 or cfg.batch_size < 1:
        raise ValueError(f"tokens={cfg.tokens} and batch_size={cfg.batch_size} must be positive")
    if cfg.drivers.enabled:
        check_factors(cfg.drivers.factor_up, cfg.drivers.factor_down)
    model_path = resolve_model_path(cfg.model_path)
    validate_checkpoint_dir(model_path)
    out_dir = Path(cfg.out_dir).expanduser() if cfg.out_dir else model_path.parent / "analysis"
    model = AutoModelForCausalLM.from_pretrained(model_path, local_files_only=True, dtype=torch.float32).eval()
    view = ExpertView(model)  # a dense model stops here: it has no experts to analyse
    fingerprint = checkpoint_fingerprint(model_path)

    if not cfg.data.tokenizer_path and has_tokenizer(model_path):
        cfg.data.tokenizer_path = str(model_path)
    prepared = prepare_data(cfg.data, progress=cfg.progress)
    if len(prepared.load_tokenizer()) > model.config.vocab_size:
        raise ModelError(
            f"the data's tokenizer has more tokens than the model's vocabulary ({model.config.vocab_size}); set "
            "data.tokenizer_path to the model's tokenizer"
        )
    split = PackedSplit.from_dataset(prepared.load_split(cfg.split))
    seq_len = split.input_ids_NT.shape[1]
    rows = _rows(len(split), seq_len, cfg.tokens)
    batches = [rows[i : i + cfg.batch_size] for i in range(0, len(rows), cfg.batch_size)]

    stats = RoutingStatistics(view, len(prepared.domains), prepared.domains)
    observer = RouterObserver(model, view)
    subscription = stats.attach(observer)
    with torch.no_grad():
        for index in tqdm(batches, desc="routing statistics", unit="batch", disable=not cfg.progress):
            stats.set_domains(split.domain_ids_NT[index].reshape(-1))
            model(input_ids=split.input_ids_NT[index])
    subscription.remove()
    observer.close()
    summary = summarise(stats, min_tokens=cfg.min_tokens, specialisation_threshold=cfg.specialisation_threshold)

    drivers = None
    if cfg.drivers.enabled:
        scan_rows = _rows(len(split), seq_len, cfg.drivers.tokens)
        scan_batches = [scan_rows[i : i + cfg.batch_size] for i in range(0, len(scan_rows), cfg.batch_size)]
        drivers = driver_scan(
            model,
            [split.input_ids_NT[index] for index in scan_batches],
            [split.domain_ids_NT[index] for index in scan_batches],
            factor_up=cfg.drivers.factor_up,
            factor_down=cfg.drivers.factor_down,
            experts_per_forward=cfg.drivers.experts_per_forward,
            progress=cfg.progress,
            num_domains=len(prepared.domains),
            view=view,
        )
    result = AnalysisResult(out_dir, model_path, fingerprint, summary, drivers)
    write_outputs(result, stats, view, cfg)
    log.info("analysis written to %s", out_dir)
    return result
