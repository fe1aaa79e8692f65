"""``callbacks.progressive_prune``: task-specific progressive expert pruning during fine-tuning (Chen et al. 2022;
the EMA criterion of the MC-SMoE reproduction), down to ``target`` experts per MoE layer, then checkpoint surgery::

    connito train model.path=runs/quickstart/hf data=code optim=finetune train.steps=300 \\
        +callbacks.progressive_prune.target=1 +callbacks.progressive_prune.window=20

**Usage.** The callback subscribes to the run's router observer (:meth:`Trainer.router_observer`) and counts, per
optimizer step, how many of the routed top-k choices of the step's training tokens went to each *surviving* expert
(ESFT's token-selection count; validation forwards are not counted). The step's share per layer
``f_e = count_e / sum over survivors`` feeds an exponential moving average per (layer, expert),
``u <- ema * u + (1 - ema) * f`` (the first step sets ``u = f``).

**Drops.** At the end of every window of ``window`` optimizer steps (global steps ``window``, ``2 * window``, ...),
for the first ``W = floor(schedule_end * train.steps / window)`` windows, every MoE layer with ``n`` survivors:

1. normalises the EMA over its survivors, ``p_e = u_e / sum_survivors u`` (uniform if all are 0);
2. marks every survivor with ``p_e < beta / n`` (MC-SMoE's threshold, ``beta = 0.1``);
3. drops ``d = clamp(max(#marked, n - cap(w)), 0, n - target)`` survivors, the lowest ``p`` first (ties: the higher
   expert index goes first). ``cap(w) = E - floor((E - target) * w / W)`` is a linear schedule from E experts to
   ``target`` at the last window: the threshold may prune faster than the schedule (never below ``target``), and
   where it drops too few, the schedule forces the least-used ones out, so every layer holds exactly ``target``
   experts after window W. The remaining ``(1 - schedule_end)`` of the run fine-tunes the pruned model.

The pure parts are in :mod:`connito.retirement.progressive_schedule`.

**Masking.** Dropped experts get an additive -inf on their router logits
(:class:`connito.retirement.progressive_mask.AdditiveExpertMask`): surviving logits are bit-identical, so their
order never changes, dead experts get softmax weight exactly 0 and can never be chosen over a survivor. When fewer
experts than the model's top-k survive, the top-k's surplus picks are dead experts at weight 0, i.e. the model
routes like one holding the survivors with ``top_k = survivors``.

**Outputs.** ``<run>/progressive_prune.json`` (rank 0, rewritten at every window and at the end): the options, per
window the step, the cap, the threshold, the normalised usage, the dropped experts and the alive mask (rows in
``moe_layers`` order), and ``kept``: the surviving experts per layer. The trainer's HF export ``<run>/hf`` is the
*full* model (every expert, no mask: its dead experts would route again); after it is written, the callback writes
``<run>/pruned/``: the export without the dead experts (:func:`connito.routing.opt_out.save_without_experts`;
``num_experts_per_tok`` lowered to the survivors where fewer than top-k are left), which plain transformers loads
and which computes what the masked model computed, plus ``<run>/progressive_prune_report.md``. Only finished runs
with ``train.export=true`` get ``pruned/``.

**Resume.** The EMA, the alive mask, the windows done and the history are saved with every checkpoint
(``state_dict``) and restored on resume, so a resumed run continues the schedule exactly. The counts of a step are
reduced over ranks before the EMA sees them: every rank holds the same schedule.

**Refused, with the fix**: ``target < 1``, ``target >= `` experts per layer, ``window < 1``, ``beta`` outside
(0, 1), ``ema`` outside [0, 1), ``schedule_end`` outside (0, 1], a run too short for one window,
``parallel.ep_size > 1`` (AutoEP layers), group-limited routing with several groups, DeepSeek-V3's top-2 group score
with ``target < 2``, and ``callbacks.des_moe`` in the same run (it replaces the routers this edits).

Shape legend: M MoE layers (``view.moe_layers`` order), E routed experts per layer.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from connito.common.atomic import atomic_write_text
from connito.experts import ExpertView
from connito.models.loading import checkpoint_parameters
from connito.retirement.progressive_mask import AdditiveExpertMask, MaskError, check_maskable
from connito.retirement.progressive_schedule import OPTION, PruneSchedule
from connito.retirement.records import ProgressivePruneRecord
from connito.routing import RoutingRecord
from connito.routing.edits import routing_rule
from connito.training.callbacks import Callback, CallbackError, MicroBatch

if TYPE_CHECKING:
    from connito.training.trainer import Trainer

log = logging.getLogger("connito.retirement")

SCHEMA = ProgressivePruneRecord.SCHEMA
JSON_FILE = ProgressivePruneRecord.FILE
REPORT_FILE = "progressive_prune_report.md"
PRUNED_DIR = "pruned"


# -- the surgery -------------------------------------------------------------------------------------------------


def write_pruned(export_dir: str | Path, kept: Mapping[int, list[int]], out_dir: str | Path) -> dict:
    """Write the checkpoint at ``export_dir`` keeping only ``kept`` experts per MoE layer (every layer as many) to
    ``out_dir`` (replaced if it exists), with ``num_experts_per_tok`` lowered to the survivors where fewer than
    top-k are left. Returns what it did: ``top_k`` before and after, ``kept``, ``removed``."""
    from transformers import AutoConfig

    from connito.models.families import get_family
    from connito.models.loading import validate_checkpoint_dir
    from connito.routing.opt_out import PROVENANCE_FILE, save_without_experts

    export_dir, out_dir = Path(export_dir).resolve(), Path(out_dir).resolve()
    validate_checkpoint_dir(export_dir)
    config = AutoConfig.from_pretrained(export_dir, local_files_only=True)
    layout = get_family(config.model_type).layout
    num_experts, top_k = int(getattr(config, layout.num_experts_key)), int(getattr(config, layout.top_k_key))
    sizes = {len(experts) for experts in kept.values()}
    if len(sizes) != 1:
        raise CallbackError(
            f"{OPTION}: the layers keep different numbers of experts ({ {k: len(v) for k, v in kept.items()} }); "
            "a transformers config has one expert count. Let the schedule run to its last window"
        )
    size = sizes.pop()
    removed = [(layer, e) for layer, experts in kept.items() for e in range(num_experts) if e not in experts]
    new_top_k = min(top_k, size)
    if new_top_k == top_k:
        save_without_experts(export_dir, removed, out_dir, overwrite=True)
    else:  # the same checkpoint with top-k lowered to what is left: a staged view of its files, a new config.json
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".progressive-source-", dir=out_dir.parent) as tmp:
            source = Path(tmp)
            for file in export_dir.iterdir():
                if file.is_file() and file.name != "config.json":
                    (source / file.name).symlink_to(file)
            setattr(config, layout.top_k_key, new_top_k)
            config.save_pretrained(source)
            save_without_experts(source, removed, out_dir, overwrite=True)
    provenance_file = out_dir / PROVENANCE_FILE
    provenance = json.loads(provenance_file.read_text())
    provenance.update(source=str(export_dir), top_k={"before": top_k, "after": new_top_k}, method=SCHEMA)
    atomic_write_text(provenance_file, json.dumps(provenance, indent=2) + "\n")
    return {
        "top_k": {"before": top_k, "after": new_top_k},
        "kept": {str(k): v for k, v in kept.items()},
        "removed": removed,
    }


# -- the callback ------------------------------------------------------------------------------------------------


class ProgressivePrune(Callback):
    """Options: ``target`` (experts kept per MoE layer at the end, >= 1), ``window`` (optimizer steps per window),
    ``beta`` (threshold factor, 0.1), ``ema`` (EMA decay per step, 0.9), ``schedule_end`` (share of
    ``train.steps`` by which the schedule reaches ``target``, 0.75), ``write_pruned`` (the surgery at the end, true).
    See the module docstring."""

    def __init__(
        self,
        target: int,
        window: int,
        beta: float = 0.1,
        ema: float = 0.9,
        schedule_end: float = 0.75,
        write_pruned: bool = True,
    ):
        if not isinstance(target, int) or isinstance(target, bool) or target < 1:
            raise CallbackError(
                f"{OPTION}.target={target!r}: keep at least one expert per MoE layer (an integer target >= 1)"
            )
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise CallbackError(
                f"{OPTION}.window={window!r}: a window is a positive whole number of optimizer steps (e.g. window=10)"
            )
        if not 0.0 < float(beta) < 1.0:
            raise CallbackError(
                f"{OPTION}.beta={beta!r}: the threshold beta / n_alive needs beta in (0, 1); MC-SMoE uses beta=0.1"
            )
        if not 0.0 <= float(ema) < 1.0:
            raise CallbackError(f"{OPTION}.ema={ema!r}: the EMA decay per step must be in [0, 1) (0.9 by default)")
        if not 0.0 < float(schedule_end) <= 1.0:
            raise CallbackError(
                f"{OPTION}.schedule_end={schedule_end!r}: the share of train.steps by which every layer is down to "
                "target must be in (0, 1] (0.75 by default: the last quarter fine-tunes the pruned model)"
            )
        self.target, self.window = target, window
        self.beta, self.ema, self.schedule_end = float(beta), float(ema), float(schedule_end)
        self.write_pruned = bool(write_pruned)
        self.schedule: PruneSchedule | None = None
        self.mask: AdditiveExpertMask | None = None
        self.top_k = 0
        self.pruned_dir: Path | None = None
        self._index: dict[int, int] = {}
        self._counts_ME: torch.Tensor | None = None
        self._counting = False

    # -- setup -----------------------------------------------------------------------------------------------------
    def options(self) -> dict:
        return {
            "target": self.target,
            "window": self.window,
            "beta": self.beta,
            "ema": self.ema,
            "schedule_end": self.schedule_end,
        }

    def on_model_built(self, trainer: Trainer, model: torch.nn.Module) -> None:
        cfg = trainer.cfg
        if cfg.parallel.ep_size != 1:
            raise CallbackError(
                f"{OPTION} needs parallel.ep_size=1, not {cfg.parallel.ep_size}: its mask edits transformers routers "
                "and the surgery reads the full export; AutoEP's routers are not covered. Use parallel.ep_size=1 "
                "(ZeRO 1/2 still shard the optimizer over data-parallel ranks)"
            )
        if "des_moe" in cfg.callbacks:
            raise CallbackError(
                f"{OPTION} and callbacks.des_moe cannot run together: DES-MoE replaces the routers the pruning mask "
                "edits. Run DES-MoE first, then prune its export"
            )
        view = ExpertView(model)
        if self.target >= view.num_experts:
            raise CallbackError(
                f"{OPTION}.target={self.target}: the model has {view.num_experts} experts per MoE layer; set a target "
                f"below it (1 to {view.num_experts - 1}) to prune any"
            )
        try:
            check_maskable(view)
        except MaskError as err:
            raise CallbackError(f"{OPTION}: {err}") from None
        rule = routing_rule(view, view.moe_layers[0])
        if rule.groups is not None and rule.group_score == "top2_sum" and self.target < 2:
            raise CallbackError(
                f"{OPTION}.target={self.target}: {view.family.model_type} scores its expert group by the sum of its "
                "two best experts, so a layer must keep at least 2: set target >= 2"
            )
        num_windows = math.floor(self.schedule_end * cfg.train.steps / self.window)
        if num_windows < 1:
            raise CallbackError(
                f"{OPTION}.window={self.window} is longer than schedule_end x train.steps = {self.schedule_end} x "
                f"{cfg.train.steps}: no window would end in time. Lower window (at most "
                f"{max(1, math.floor(self.schedule_end * cfg.train.steps))}) or raise train.steps"
            )
        if num_windows < 2 and view.num_experts - self.target > 1 and trainer.info.is_main:
            log.warning("%s: one window drops %d experts per layer at once", OPTION, view.num_experts - self.target)
        self.top_k = view.top_k
        self._index = {layer: m for m, layer in enumerate(view.moe_layers)}
        self.schedule = PruneSchedule(
            view.moe_layers, view.num_experts, self.target, num_windows, beta=self.beta, ema=self.ema
        )

    def on_engine_built(self, trainer: Trainer) -> None:
        model = trainer.engine.module
        self.mask = AdditiveExpertMask(model, view=ExpertView(model))
        self._subscription = trainer.router_observer().subscribe(self._count)

    def load_state_dict(self, state: dict) -> None:
        self.schedule.load_state_dict(state)
        self.mask.set_dead(~self.schedule.alive_ME)

    def state_dict(self) -> dict:
        return self.schedule.state_dict() if self.schedule is not None else {}

    # -- counting --------------------------------------------------------------------------------------------------
    def on_micro_batch(self, trainer: Trainer, batch: MicroBatch) -> None:
        self._counting = True

    def _count(self, record: RoutingRecord) -> None:
        if not self._counting:  # validation forwards and anything else outside a training step
            return
        ids_TK = record.topk_ids_TK.detach()
        if self._counts_ME is None:
            self._counts_ME = torch.zeros(
                len(self._index), self.schedule.num_experts, dtype=torch.float64, device=ids_TK.device
            )
        counts_E = torch.bincount(ids_TK.flatten(), minlength=self.schedule.num_experts)
        self._counts_ME[self._index[record.layer]] += counts_E.to(torch.float64)

    def on_step_end(self, trainer: Trainer, losses: Mapping[str, float]) -> None:
        self._counting = False
        schedule = self.schedule
        counts_ME = self._counts_ME
        if counts_ME is None:
            counts_ME = torch.zeros(schedule.alive_ME.shape, dtype=torch.float64, device=trainer.engine.device)
        if dist.is_initialized() and dist.get_world_size() > 1:  # every rank holds the same schedule
            dist.all_reduce(counts_ME)
        schedule.observe(counts_ME)
        self._counts_ME = None
        step = trainer.state.step
        if step % self.window or schedule.finished:
            return
        schedule.end_window(step)
        self.mask.set_dead(~schedule.alive_ME)
        if trainer.info.is_main:
            dropped = {layer: e for layer, e in schedule.history[-1]["dropped"].items() if e}
            alive = schedule.alive_ME.sum(dim=1).tolist()
            log.info(
                "progressive pruning, window %d/%d (step %d): dropped %s; experts alive per layer %s",
                schedule.windows_done, schedule.num_windows, step, dropped or "none", alive,
            )  # fmt: skip
            self.write_json(trainer)

    def on_metrics(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        alive_M = self.schedule.alive_ME.sum(dim=1).double()
        metrics["prune/alive_mean"] = float(alive_M.mean())
        metrics["prune/alive_max"] = float(alive_M.max())
        metrics["prune/windows_done"] = float(self.schedule.windows_done)

    def on_train_end(self, trainer: Trainer) -> None:
        if trainer.info.is_main:
            self.write_json(trainer)
            if self.write_pruned and trainer.result.finished and not trainer.cfg.train.export:
                log.warning("%s: no pruned checkpoint: the surgery reads the HF export and train.export=false", OPTION)

    # -- outputs ---------------------------------------------------------------------------------------------------
    def record(self, trainer: Trainer) -> ProgressivePruneRecord:
        schedule = self.schedule
        return ProgressivePruneRecord(
            options=self.options(),
            train_steps=trainer.cfg.train.steps,
            num_windows=schedule.num_windows,
            windows_done=schedule.windows_done,
            moe_layers=schedule.moe_layers,
            num_experts=schedule.num_experts,
            top_k=self.top_k,
            windows=schedule.history,
            alive_mask=schedule.alive_ME.int().tolist(),
            kept={str(layer): experts for layer, experts in schedule.kept().items()},
            pruned_dir=str(self.pruned_dir) if self.pruned_dir else None,
        )

    def write_json(self, trainer: Trainer) -> Path:
        return self.record(trainer).save(trainer.run_dir / JSON_FILE)

    def on_exported(self, trainer: Trainer, export_dir) -> None:
        if self.write_pruned and trainer.info.is_main:
            self.after_export(trainer)
        if self.write_pruned and dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()

    def after_export(self, trainer: Trainer) -> None:
        """Rank 0, after the trainer's HF export of a finished run: ``<run>/pruned/`` and the report."""
        result, schedule = trainer.result, self.schedule
        if not schedule.finished:
            log.warning(
                "%s: the schedule did %d of its %d windows (train.steps changed on resume?): no pruned checkpoint",
                OPTION, schedule.windows_done, schedule.num_windows,
            )  # fmt: skip
            return
        out = trainer.run_dir / PRUNED_DIR
        done = write_pruned(result.export_dir, schedule.kept(), out)
        self.pruned_dir = out
        self.write_json(trainer)
        report = self.report(trainer, done, checkpoint_parameters(result.export_dir), checkpoint_parameters(out))
        (trainer.run_dir / REPORT_FILE).write_text(report)
        print(report, flush=True)

    def report(self, trainer: Trainer, done: dict, numel_before: int, numel_after: int) -> str:
        schedule = self.schedule
        lines = [
            "## Progressive pruning",
            "",
            f"{schedule.num_experts} -> {self.target} experts per MoE layer over {schedule.num_windows} windows of "
            f"{self.window} steps (beta {self.beta}, EMA {self.ema}); top-k {done['top_k']['before']} -> "
            f"{done['top_k']['after']}; parameters {numel_before:,} -> {numel_after:,}.",
            "",
            "| window | step | cap | alive per layer | dropped |",
            "|---|---|---|---|---|",
        ]
        for entry in schedule.history:
            alive = [sum(row) for row in entry["alive_mask"]]
            dropped = "; ".join(f"{layer}: {e}" for layer, e in entry["dropped"].items() if e) or "-"
            lines.append(f"| {entry['window']} | {entry['step']} | {entry['cap']} | {alive} | {dropped} |")
        lines += ["", "Kept experts (old ids; the pruned checkpoint numbers them 0..n-1 in this order):", ""]
        lines += [f"- layer {layer}: {experts}" for layer, experts in schedule.kept().items()]
        validation = trainer.result.validation
        if validation:
            cells = ", ".join(f"{k} {v:.3f}" for k, v in validation.items())
            lines += ["", f"Validation loss of the masked model (= the pruned checkpoint): {cells}"]
        lines += ["", f"pruned checkpoint: {self.pruned_dir}", f"schedule:          {trainer.run_dir / JSON_FILE}", ""]
        return "\n".join(lines)
