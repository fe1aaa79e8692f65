"""``connito adapt``: fine-tune a base checkpoint to a domain with one method on the one trainer, then measure what
it gained and what it forgot.

The method only chooses callbacks of :func:`connito.training.trainer.run_training`; there is no loop here:

* ``full``: no callback, every parameter trains (the reference the others are measured against);
* ``esft``: the ``trainable`` callback with the experts of a ``connito.mask/1`` file
  (:mod:`connito.training.callbacks.trainable`: slice-exact gradient masks, frozen tensors without optimizer
  state). Without ``esft.mask_file`` rank 0 first analyses the training data on the base model (``connito
  analyze`` on the train split, no driver scan), selects with ESFT's rule (``esft.score``, ``esft.top_p``) and
  writes ``<run>/mask.json``, which a rerun of the same command reuses;
* ``des_moe``: the ``des_moe`` callback (:mod:`connito.adaptation.des_moe`), options as ``+callbacks.des_moe.<k>=v``.

After training, rank 0 measures the outcome (:mod:`connito.adaptation.outcome`): validation loss of base and adapted
model on every evaluated domain, trainable parameters, optimizer-state bytes, step time, and the delta package of
everything the run changed; it writes ``<run>/adapt.json`` and prints the row.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from connito.adaptation.config import METHODS, AdaptConfig
from connito.models.families import ModelError

if TYPE_CHECKING:
    from connito.adaptation.outcome import AdaptOutcome
    from connito.training.trainer import TrainResult

log = logging.getLogger("connito.adaptation")

MASK_FILE = "mask.json"


def check_adapt(cfg: AdaptConfig) -> Path:
    """The base checkpoint (``model.path``, a run directory's ``hf/`` export, or the default base), once the options
    are known to make sense (before any work); ``cfg`` is not changed."""
    if cfg.method not in METHODS:
        raise ValueError(f"method='{cfg.method}' is not one of {', '.join(METHODS)}")
    from connito.models.default_paths import HINT, default_checkpoint

    given = bool(cfg.model.path)
    base = Path(cfg.model.path).expanduser() if given else default_checkpoint()
    if (base / "hf" / "config.json").is_file():  # a connito run directory
        base = base / "hf"
    if not (base / "config.json").is_file():
        hint = "" if given else f" No model.path given: {HINT}, or set model.path=<save_pretrained directory>."
        raise ModelError(f"model.path='{base}' is not a save_pretrained checkpoint (no config.json).{hint}")
    if cfg.method == "esft":
        esft = cfg.esft
        if esft.score not in ("gate", "token"):
            raise ValueError(f"esft.score='{esft.score}' is not one of gate, token")
        if not 0 < esft.top_p <= 1:
            raise ValueError(f"esft.top_p={esft.top_p} must be in (0, 1] (ESFT's default is 0.2)")
        if esft.mask_file and not Path(esft.mask_file).expanduser().is_file():
            raise ValueError(f"esft.mask_file='{esft.mask_file}' is not a file; write one with `connito select`")
    elif cfg.method == "des_moe" and "trainable" in cfg.callbacks:
        raise ValueError("method=des_moe chooses what trains itself (its phases); remove callbacks.trainable")
    if cfg.method != "esft" and cfg.esft.mask_file:
        raise ValueError(f"esft.mask_file is set but method={cfg.method}; use method=esft or drop the mask")
    return base


@dataclass
class AdaptResult:
    train: TrainResult
    """The trainer's result (run directory, steps, model, engine)."""
    outcome: AdaptOutcome | None
    """The ``adapt.json`` record: on rank 0 once the run finished, else None."""


def run_adapt(cfg: AdaptConfig, run_dir: Path) -> AdaptResult:
    """Adapt as ``cfg`` says in ``run_dir``."""
    from connito.training.collective import convert_once_on_main
    from connito.training.distributed import init_distributed
    from connito.training.trainer import run_training

    base = check_adapt(cfg)
    info = init_distributed(cfg.engine.backend)
    callbacks = copy.deepcopy(cfg.callbacks)
    if cfg.method == "esft":
        mask_path = Path(cfg.esft.mask_file).expanduser() if cfg.esft.mask_file else run_dir / MASK_FILE
        if not cfg.esft.mask_file:
            convert_once_on_main(
                mask_path,
                lambda: select_for_training(cfg, base, run_dir, mask_path),
                f"selecting experts on the training data (ESFT-{cfg.esft.score}, top_p={cfg.esft.top_p})",
                info.is_main,
            )
        from connito.experts.mask_file import read_mask_file

        read_mask_file(mask_path, base)  # another model's mask (fingerprint or shape) stops here, before training
        callbacks["trainable"] = {
            "mask_file": str(mask_path),
            "shared_experts": cfg.esft.shared_experts,
            "routers": cfg.esft.routers,
            "modules": list(cfg.esft.modules),
        }
    elif cfg.method == "des_moe":
        callbacks.setdefault("des_moe", {})
    # the run's own config, built from the caller's (which is left as it was): the resolved base, the method's callbacks
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=str(base)), callbacks=callbacks)
    result = run_training(cfg, run_dir)
    outcome = None
    if result.finished:
        from connito.adaptation.outcome import measure_outcome, trainable_elements

        trainable = trainable_elements(result)  # collective under expert parallelism
        if info.is_main:
            outcome = measure_outcome(cfg, base, result, trainable)
    return AdaptResult(result, outcome)


def select_for_training(cfg: AdaptConfig, base: Path, run_dir: Path, mask_path: Path) -> None:
    """ESFT's selection on the training data: analyse it on the base model, select, write ``mask_path``."""
    from connito.adaptation.selection import select_experts
    from connito.analysis.config import AnalyzeConfig
    from connito.analysis.record import AnalysisRecord
    from connito.analysis.run import run_analysis
    from connito.experts.mask_file import write_mask_file

    analysis_cfg = AnalyzeConfig(
        model_path=str(base),
        data=copy.deepcopy(cfg.data),
        split="train",
        tokens=cfg.esft.analysis_tokens,
        out_dir=str(run_dir / "selection"),
        progress=cfg.logging.progress,
    )
    analysis_cfg.drivers.enabled = False
    analysis_cfg.sufficiency.enabled = False
    result = run_analysis(analysis_cfg)
    analysis = AnalysisRecord.load(result.out_dir)
    domains = analysis.data.usable_domains
    mask = select_experts(analysis, cfg.esft.score, domains, top_p=cfg.esft.top_p)
    write_mask_file(
        mask_path,
        mask,
        analysis.model.to_dict(),
        {"method": cfg.esft.score, "domains": domains, "top_p": cfg.esft.top_p, "source": str(result.out_dir)},
    )
    log.info("selected %d experts for %s: %s", len(mask), ", ".join(domains), mask_path)
