"""Write the trained model as a Hugging Face ``save_pretrained`` directory (safetensors + tokenizer)."""

import logging
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
) -> None:
    """Collective under ZeRO-3 (all ranks gather the partitioned weights) and under expert parallelism (all ranks
    gather their expert shards into the family's fused layout); rank 0 writes. ``edit(state_dict)``, when given,
    changes the state dict in place on rank 0 before it is written (``Callback.on_export``)."""
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
        log.info("HF export written to %s", out_dir)
    if dist.is_initialized():
        dist.barrier()
