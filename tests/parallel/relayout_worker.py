"""One rank of a re-layout test: trains (or resumes) with the given overrides and dumps the full model and its
AdamW state.

Usage: torchrun --nproc_per_node N tests/parallel/relayout_worker.py RUN_DIR DUMP_DIR [key=value ...]

A callback (the trainer's own ``on_save`` / ``on_load`` events) makes rank 0 write ``DUMP_DIR/saved_step{S}.pt``
right after every checkpoint save and ``DUMP_DIR/loaded.pt`` right after a resume's load: the full transformers
state dict (every expert, global numbering) of the model at that moment and, under ``adam.<state>.<name>``, the
AdamW moments ``exp_avg`` / ``exp_avg_sq`` of every parameter in the same naming, gathered over the expert-parallel
group (collectives, so every rank runs them).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from connito.parallel import gather_hf_state_dict  # noqa: E402
from connito.training.callbacks import Callback  # noqa: E402
from connito.training.trainer import run_training  # noqa: E402
from tests.helpers import compose_train  # noqa: E402

MOMENTS = ("exp_avg", "exp_avg_sq")


def adam_moment(engine, param: torch.nn.Parameter, key: str) -> torch.Tensor:
    """``param``'s AdamW moment as a tensor of its shape (zeros before the first step), whatever the ZeRO stage."""
    from deepspeed.utils import safe_get_full_optimizer_state

    if engine.zero_optimization_stage() == 0:
        optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)
        state = optimizer.state.get(param, {})
        return state[key].detach().clone() if key in state else torch.zeros_like(param)
    value = safe_get_full_optimizer_state(param, key)
    return torch.zeros_like(param) if value is None else value.detach().clone().reshape(param.shape)


def relink_optimizer_fragments(engine) -> None:
    """DeepSpeed 0.19.8's ZeRO-1/2 optimizer links each parameter to its optimizer-state fragment once, right after
    the first parameter group's first step, when the later groups have no state yet: their fragments stay empty
    and ``safe_get_full_optimizer_state`` fails for them. Link again now that every group has stepped."""
    optimizer = engine.optimizer
    if hasattr(optimizer, "_hp_optimizer_states_linked"):
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()


def full_state(engine) -> dict[str, torch.Tensor]:
    """Parameters and AdamW moments under transformers names, every expert: the moments are gathered by swapping
    each parameter's data for its moment while ``gather_hf_state_dict`` reads the model."""
    from transformers import AutoModelForCausalLM

    model = engine.module
    relink_optimizer_fragments(engine)
    out = gather_hf_state_dict(model)
    hf_params = set(dict(AutoModelForCausalLM.from_config(model.config).named_parameters()))
    params = list(model.parameters())
    for key in MOMENTS:
        moments = [adam_moment(engine, p, key) for p in params]
        saved = [p.data for p in params]
        try:
            for p, moment in zip(params, moments):
                p.data = moment
            gathered = gather_hf_state_dict(model)
        finally:
            for p, data in zip(params, saved):
                p.data = data
        out.update({f"adam.{key}.{name}": gathered[name] for name in hf_params})
    return out


class DumpOnCheckpoint(Callback):
    def __init__(self, dump_dir: Path):
        self.dump_dir = dump_dir

    def _dump(self, trainer, name: str) -> None:
        state = full_state(trainer.engine)
        if dist.get_rank() == 0:
            torch.save(state, self.dump_dir / name)
        dist.barrier()

    def on_save(self, trainer, checkpoint) -> None:
        self._dump(trainer, f"saved_step{trainer.state.step}.pt")

    def on_load(self, trainer, checkpoint) -> None:
        self._dump(trainer, "loaded.pt")


def main() -> None:
    run_dir, dump_dir, overrides = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    dump_dir.mkdir(parents=True, exist_ok=True)
    run_training(compose_train(overrides), run_dir, callbacks=[DumpOnCheckpoint(dump_dir)])
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
