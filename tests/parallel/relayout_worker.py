"""One rank of a re-layout test: trains (or resumes) with the given overrides and dumps the full model.

Usage: torchrun --nproc_per_node N tests/parallel/relayout_worker.py RUN_DIR DUMP_DIR [key=value ...]

Rank 0 writes ``DUMP_DIR/saved_step{S}.pt`` right after every checkpoint save and ``DUMP_DIR/loaded.pt`` right
after a resume's load: the full transformers state dict (every expert, global numbering) of the model at that
moment, gathered over the expert-parallel group (a collective, so every rank runs it).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from connito.parallel import gather_hf_state_dict  # noqa: E402
from connito.training import checkpointing  # noqa: E402
from connito.training.trainer import run_training  # noqa: E402
from tests.helpers import compose_train  # noqa: E402


def main() -> None:
    run_dir, dump_dir, overrides = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    dump_dir.mkdir(parents=True, exist_ok=True)
    save, load = checkpointing.save, checkpointing.load

    def dump(engine, name: str) -> None:
        state = gather_hf_state_dict(engine.module)
        if dist.get_rank() == 0:
            torch.save(state, dump_dir / name)
        dist.barrier()

    def saving(engine, root, state, *args, **kwargs):
        target = save(engine, root, state, *args, **kwargs)
        dump(engine, f"saved_step{state.step}.pt")
        return target

    def loading(engine, checkpoint, *args, **kwargs):
        state = load(engine, checkpoint, *args, **kwargs)
        dump(engine, "loaded.pt")
        return state

    checkpointing.save, checkpointing.load = saving, loading
    run_training(compose_train(overrides), run_dir)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
