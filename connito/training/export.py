"""Write the trained model as a Hugging Face ``save_pretrained`` directory (safetensors + tokenizer)."""

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from connito.parallel.expert_parallel import build_hf_model, gather_hf_state_dict, is_expert_parallel

log = logging.getLogger("connito.training")


def export_hf(
    engine,
    tokenizer,
    out_dir: Path,
    is_main: bool,
    zero_stage: int,
    edit: Callable[[dict[str, torch.Tensor]], None] | None = None,
    start: str | Path | None = None,
) -> None:
    """Collective under ZeRO-3 (all ranks gather the partitioned weights) and under expert parallelism (all ranks
    gather their expert shards into the family's fused layout); rank 0 writes. ``edit(state_dict)``, when given,
    changes the state dict in place on rank 0 before it is written (``Callback.on_export``). ``start``: the
    checkpoint the run started from (``model.path``); its Connito provenance files are carried over
    (:func:`carry_provenance`)."""
    model = engine.module
    if is_expert_parallel(model):
        state_dict = gather_hf_state_dict(model)  # collective over each expert-parallel group
        if is_main:
            model = build_hf_model(model, state_dict)  # plain transformers blocks, every expert
        state_dict = None
    elif zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            state_dict = {k: v.detach().clone().cpu() for k, v in model.state_dict().items()} if is_main else None
    else:
        state_dict = None
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if edit is not None:
            if state_dict is None:
                state_dict = dict(model.state_dict())
            edit(state_dict)
        with torch.no_grad():
            model.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
        if start:
            carry_provenance(Path(start), out_dir)
        log.info("HF export written to %s", out_dir)
    if dist.is_initialized():
        dist.barrier()


PROVENANCE_GLOB = "connito_*.json"


def carry_provenance(start: Path, out_dir: Path) -> list[str]:
    """Copy the start checkpoint's ``connito_*.json`` files (what a composition wrote about the model: which expert
    came from which branch or data owner, the public model's fingerprint) into the export, so a model trained from
    a composed checkpoint still says what it is made of. Returns the names copied."""
    copied = []
    for file in sorted(Path(start).glob(PROVENANCE_GLOB)):
        if file.is_file() and not (out_dir / file.name).exists():
            shutil.copy2(file, out_dir / file.name)
            copied.append(file.name)
    return copied
