"""Every place the training layer reaches into DeepSpeed's private internals, one small function per workaround.

Connito trains on DeepSpeed's public API (``deepspeed.initialize``, ``engine.backward/step``,
``save_checkpoint/load_checkpoint``), but a few things it needs have no public API in DeepSpeed 0.19.8: dropping one
optimizer step, finding which elements of a parameter a ZeRO-1/2 rank's flat fp32 partition holds, reading and
re-laying DeepSpeed's own checkpoint files, converting a checkpoint to a universal one from inside a run, and
putting back what a ZeRO-2 load overwrites. Each such use is a function here, whose docstring says which DeepSpeed
behaviour it works around and for which version; the rest of ``connito.training`` calls only these.

Every function checks, on first use, that the installed DeepSpeed is in :data:`TESTED_DEEPSPEED` (setup.py pins the
same version) and raises :class:`DeepSpeedVersionError` naming the installed and the supported versions and the fix
otherwise: an untested DeepSpeed fails at the first workaround, loudly, not with a wrong optimizer state later.

For maintainers, upgrading DeepSpeed: install the new version, widen :data:`TESTED_DEEPSPEED` here (and the pin in
setup.py; AutoEP's own check is ``connito.parallel.expert_parallel.DEEPSPEED_VERSION``), and run
``tests/training/test_deepspeed_internals.py``: it has one test per workaround against the real DeepSpeed on CPU
(private attribute names, file names and formats, the overflow path, ``ds_to_universal``'s arguments). Fix what
fails here, in this file; then run the slow checkpoint and relayout tests (``tests/training/test_checkpointing.py``,
``tests/parallel/``) with ``-m slow``. The lower layers use DeepSpeed's AutoEP through its module seams only
(``connito.parallel.expert_parallel``, ``connito.experts.blocks``, ``connito.experts.lean.forward``); they are not
private attributes and stay there (a lower layer never imports this one).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import torch
from packaging.specifiers import SpecifierSet
from packaging.version import Version

TESTED_DEEPSPEED = SpecifierSet("==0.19.8")
"""The DeepSpeed versions whose internals this module was tested against (setup.py pins ``deepspeed==0.19.8``)."""


class DeepSpeedVersionError(RuntimeError):
    """The installed DeepSpeed is not one whose private internals Connito was tested against."""


def check_deepspeed_version(installed: Version | str | None = None) -> None:
    """Refuse a DeepSpeed outside :data:`TESTED_DEEPSPEED` (``installed``: the installed version by default)."""
    version = Version(str(installed)) if installed is not None else Version(metadata.version("deepspeed"))
    if version not in TESTED_DEEPSPEED:
        raise DeepSpeedVersionError(
            f"Connito relies on private internals of deepspeed{TESTED_DEEPSPEED} (ZeRO optimizer attributes, "
            f"checkpoint file formats: connito.training.deepspeed_internals); installed deepspeed=={version}. "
            f"Install the tested version: pip install 'deepspeed{TESTED_DEEPSPEED}'"
        )


_checked = False


def _require_tested() -> None:
    global _checked
    if not _checked:
        check_deepspeed_version()
        _checked = True


# -- the optimizer inside the engine ------------------------------------------------------------------------------


def inner_optimizer(engine):
    """The torch optimizer inside DeepSpeed's wrapper, or the client optimizer itself (ZeRO 0, fp32).

    DeepSpeed 0.19.8's ZeRO-1/2 and bf16 optimizers keep the torch optimizer they step as ``.optimizer``, an
    attribute, not an API; its ``param_groups`` and ``state`` are what checkpoints and gradient masks edit."""
    _require_tested()
    optimizer = engine.optimizer
    return getattr(optimizer, "optimizer", optimizer)


def offloads_optimizer(engine) -> bool:
    """Whether the engine's ZeRO optimizer steps offloaded partitions with DeepSpeed's CPU Adam (outside the torch
    optimizer). DeepSpeed 0.19.8 records it only as the ZeRO optimizer's ``cpu_offload`` attribute."""
    _require_tested()
    return bool(getattr(engine.optimizer, "cpu_offload", False))


def can_skip_update(optimizer) -> bool:
    """Whether :func:`skipped_update` can drop this optimizer's step: DeepSpeed 0.19.8's ZeRO-1/2 optimizer (its
    overflow path) or a plain torch optimizer (ZeRO 0 in fp32)."""
    _require_tested()
    return (hasattr(optimizer, "check_overflow") and hasattr(optimizer, "check_grad_overflow")) or isinstance(
        optimizer, torch.optim.Optimizer
    )


@contextmanager
def skipped_update(engine) -> Iterator[None]:
    """Inside it, the accumulation-boundary ``engine.step()`` applies no update: DeepSpeed takes its overflow path
    (gradients and reduction buffers dropped, optimizer state and parameters untouched, ``skipped_steps`` + 1, the
    learning-rate scheduler not stepped).

    DeepSpeed 0.19.8 has no "skip this step" call. Its ZeRO-1/2 optimizer (``DeepSpeedZeroOptimizer.step``) skips
    when ``check_overflow`` sets ``self.overflow``, which it calls only if ``check_grad_overflow`` (fp16 loss
    scaling) is on: both are patched on the instance for one step. The engine reads ``optimizer.overflow`` after a
    torch optimizer's step too (ZeRO 0): that step is replaced by a no-op that reports an overflow."""
    _require_tested()
    optimizer = engine.optimizer
    if hasattr(optimizer, "check_overflow") and hasattr(optimizer, "check_grad_overflow"):  # ZeRO 1/2
        saved = optimizer.check_grad_overflow
        optimizer.check_grad_overflow = True
        optimizer.check_overflow = lambda *args, **kwargs: setattr(optimizer, "overflow", True)
        try:
            yield
        finally:
            optimizer.check_grad_overflow = saved
            del optimizer.check_overflow
    else:  # a torch optimizer (ZeRO 0, fp32): the engine sets every .grad to None after the (no-op) step
        optimizer.step = lambda *args, **kwargs: None
        optimizer.overflow = True
        try:
            yield
        finally:
            del optimizer.step, optimizer.overflow


# -- ZeRO-1/2 flat partitions ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fragment:
    """The part of model parameter ``param`` that one flat fp32 partition holds: elements
    ``[lp_start, lp_start + numel)`` of the flattened parameter at ``[hp_start, hp_start + numel)`` of the partition."""

    param: torch.Tensor
    lp_start: int
    hp_start: int
    numel: int


@dataclass(frozen=True)
class ZeroPartition:
    """One parameter group's flat fp32 partition on this rank (the tensor the inner torch optimizer steps) and the
    fragment of every group parameter it holds something of."""

    flat: torch.Tensor
    fragments: list[Fragment]


def zero_partitions(zero_optimizer) -> list[ZeroPartition]:
    """The flat fp32 partitions of a ZeRO-1/2 optimizer, group by group, with each held parameter fragment.

    DeepSpeed 0.19.8 (``DeepSpeedZeroOptimizer``) keeps the model parameters of group ``i`` in
    ``bit16_groups[i]``, this rank's flat fp32 partition of it in ``single_partition_of_fp32_groups[i]``, and links
    each parameter to the fragment this rank holds through ``param._hp_mapping`` (``lp_fragment_address`` and
    ``hp_fragment_address``, ``.start`` / ``.numel``; None or absent when the rank holds none of it). DeepSpeed
    relinks them when it loads a checkpoint: call this again after every load."""
    _require_tested()
    out = []
    for index, lp_params in enumerate(zero_optimizer.bit16_groups):
        fragments = []
        for lp in lp_params:
            mapping = getattr(lp, "_hp_mapping", None)
            if mapping is None:  # no element of it in this rank's partition
                continue
            lp_address, hp_address = mapping.lp_fragment_address, mapping.hp_fragment_address
            fragments.append(Fragment(lp, lp_address.start, hp_address.start, lp_address.numel))
        out.append(ZeroPartition(zero_optimizer.single_partition_of_fp32_groups[index], fragments))
    return out


# -- DeepSpeed's checkpoint files -----------------------------------------------------------------------------------

MODEL_STATES_FILE = "mp_rank_00_model_states.pt"
"""DeepSpeed 0.19.8's module-state file of a checkpoint tag (ZeRO 0-2, no model parallelism): ``module``,
``lr_scheduler``, ``global_steps`` / ``global_samples`` / ``skipped_steps``, ``ds_autoep_layers`` under AutoEP and,
at ZeRO 0 without expert files, ``optimizer`` (the torch optimizer's state dict)."""

ENGINE_COUNTERS = ("global_steps", "global_samples", "skipped_steps")


def expert_states_file(checkpoint: Path, moe_layer: int, expert: int) -> Path:
    """DeepSpeed 0.19.8's per-expert file (``DeepSpeedEngine._get_expert_ckpt_name``): expert ``expert`` (global
    numbering) of MoE layer ``moe_layer``; under AutoEP its keys are ``<block>.experts.w{1,2,3}.<expert>``."""
    return checkpoint / f"layer_{moe_layer}_expert_{expert}_mp_rank_00_model_states.pt"


def expert_optimizer_file(checkpoint: Path, ep_rank: int) -> Path:
    """DeepSpeed 0.19.8's optimizer file of expert-parallel rank ``ep_rank`` in a checkpoint with expert layers
    (``DeepSpeedEngine._get_optimizer_ckpt_name``, ZeRO 0): ``{"optimizer": <torch optimizer state dict>}``."""
    return checkpoint / f"expp_rank_{ep_rank}_mp_rank_00_optim_states.pt"


def read_model_states(checkpoint: Path, mmap: bool = False) -> dict:
    """DeepSpeed's module-state file of ``checkpoint`` (:data:`MODEL_STATES_FILE`). It pickles more than tensors
    (config objects, the scheduler), so it is DeepSpeed's own trusted file: ``weights_only=False``. ``mmap``: read
    only the storages that are used."""
    _require_tested()
    return torch.load(checkpoint / MODEL_STATES_FILE, map_location="cpu", weights_only=False, mmap=mmap)


def read_expert_states(checkpoint: Path, moe_layer: int, expert: int) -> dict[str, torch.Tensor]:
    """The tensors of one per-expert file (:func:`expert_states_file`); tensors only, so ``weights_only=True``."""
    _require_tested()
    return torch.load(expert_states_file(checkpoint, moe_layer, expert), map_location="cpu", weights_only=True)


def read_expert_optimizer(checkpoint: Path, ep_rank: int) -> dict:
    """The torch optimizer state dict expert-parallel rank ``ep_rank`` saved (:func:`expert_optimizer_file`)."""
    _require_tested()
    return torch.load(expert_optimizer_file(checkpoint, ep_rank), map_location="cpu", weights_only=False)["optimizer"]


def autoep_layer_table(model_states: dict) -> list[dict]:
    """DeepSpeed 0.19.8's AutoEP layer table from a module-state file (``ds_autoep_layers``): one entry per AutoEP
    layer with ``module_path``, ``moe_layer_id``, ``num_experts``, ``ep_size`` and ``expert_placement``
    (``{"ranks": [{"rank": r, "experts": [...]}, ...]}``); empty without AutoEP."""
    return list(model_states.get("ds_autoep_layers") or [])


def engine_state(model_states: dict) -> dict:
    """The scheduler state and the engine's step counters (:data:`ENGINE_COUNTERS`) a module-state file holds."""
    return {k: model_states.get(k) for k in ("lr_scheduler", *ENGINE_COUNTERS)}


def set_engine_counters(engine, state: dict) -> None:
    """Put the step counters of :func:`engine_state` back into an engine, as ``load_checkpoint`` does. DeepSpeed
    0.19.8 keeps them as plain engine attributes (``global_steps``, ``global_samples``, ``skipped_steps``), which a
    checkpoint loaded by Connito itself (not by ``load_checkpoint``) must set."""
    _require_tested()
    for key in ENGINE_COUNTERS:
        setattr(engine, key, state[key])


def restore_frozen_expert_shards(engine, checkpoint: Path) -> None:
    """Put back the frozen AutoEP expert shards DeepSpeed 0.19.8 overwrites when it loads a ZeRO-2 checkpoint.

    At ZeRO 2 DeepSpeed saves every parameter its optimizer does not own (``requires_grad=False``) in rank 0's
    ``frozen_param_fragments`` and, on load, copies those into every rank (``load_module_state_dict``) -- after it
    loaded the expert shards from their per-expert files. A frozen expert shard of another expert-parallel rank
    (different experts under the same name) thus becomes a copy of rank 0's. The per-expert files
    (:func:`expert_states_file`, keys ``<block>.experts.w1.<global id>``) hold the right tensors: copy the frozen
    shards back from them. Trainable shards are not touched (the optimizer's partitions restore them)."""
    _require_tested()
    if engine.zero_optimization_stage() != 2:
        return
    from connito.parallel import autoep_layers

    for moe_layer, (prefix, layer) in enumerate(autoep_layers(engine.module).items()):
        frozen = {w: getattr(layer.experts, w) for w in ("w1", "w2", "w3")}
        frozen = {w: p for w, p in frozen.items() if not p.requires_grad}
        if not frozen:
            continue
        first = layer.ep_rank * layer.num_local_experts
        for local in range(layer.num_local_experts):
            saved = read_expert_states(checkpoint, moe_layer, first + local)
            with torch.no_grad():
                for w, param in frozen.items():
                    param[local].copy_(saved[f"{prefix}.experts.{w}.{first + local}"])


# -- universal checkpoints ------------------------------------------------------------------------------------------

UNIVERSAL_OPTIMIZER_FILE = Path("zero") / "optimizer_state.pt"
"""A universal folder's optimizer group settings (DeepSpeed 0.19.8: ``{"param_groups": [...], ...}``)."""

UNIVERSAL_STEP_FILE = "step.pt"
"""The optimizer step count beside a parameter's states in a universal ``zero/<parameter>/`` folder."""


def convert_to_universal(checkpoint: Path, output: Path) -> None:
    """Run DeepSpeed's ``ds_to_universal`` on ``checkpoint`` into ``output`` inside this process.

    DeepSpeed 0.19.8 ships the converter as a script (``deepspeed.checkpoint.ds_to_universal.main(args)`` reads an
    argparse namespace) that prints as it goes and leaves a ``latest_universal`` pointer in the checkpoint's folder
    naming the output. Here: the namespace built directly (one extract and merge worker: no process pool inside a
    training rank; ``inject_missing_state`` because non-AutoEP checkpoints carry no ``universal_checkpoint_info``),
    its output captured (in the error it raises, last 3000 characters), the pointer removed."""
    _require_tested()
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    args = SimpleNamespace(
        input_folder=str(checkpoint),
        output_folder=str(output),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            ds_to_universal(args)
    except Exception as exc:
        raise RuntimeError(f"{exc}\n{printed.getvalue()[-3000:]}") from exc
    (checkpoint / "latest_universal").unlink(missing_ok=True)


def read_universal_state(folder: Path, state: str) -> torch.Tensor | None:
    """One tensor of a universal checkpoint's ``zero/<parameter>/`` folder (``state``: ``fp32``, ``exp_avg``,
    ``exp_avg_sq``), or None when absent. DeepSpeed 0.19.8 writes ``<state>.pt`` as ``{"param": tensor, ...}``
    (metadata beside it) or, for some states, the bare tensor."""
    _require_tested()
    path = folder / f"{state}.pt"
    if not path.is_file():
        return None
    payload = torch.load(path, map_location="cpu", weights_only=False)
    return payload["param"] if isinstance(payload, dict) else payload


def write_universal_state(folder: Path, state: str, tensor: torch.Tensor, expert_count: int | None = None) -> None:
    """Write ``zero/<parameter>/<state>.pt`` as DeepSpeed 0.19.8's universal loader reads it. ``expert_count``:
    the tensor is an AutoEP expert tensor ``[E, ...]``; the loader slices each rank's experts along dim 0 only when
    it carries ``cat_dim``, ``is_expert_param`` and ``ep_num_experts``."""
    _require_tested()
    payload: dict = {"param": tensor}
    if expert_count is not None:
        payload.update({"cat_dim": 0, "is_expert_param": True, "ep_num_experts": expert_count})
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(payload, folder / f"{state}.pt")
