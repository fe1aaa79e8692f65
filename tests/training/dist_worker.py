"""One rank of a multi-process training test: trains with the given overrides, then writes a digest of its
parameters so the test can check that every rank holds the same model. Under ZeRO-3 it also asks the expert view
for an expert, as is (refused: the parameters are partitioned) and inside ``GatheredParameters`` (rank 0 saves
what it read to ``zero3_expert.pt``).

Usage: torchrun --nproc_per_node N tests/training/dist_worker.py RUN_DIR [key=value ...]
"""

import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch.distributed as dist  # noqa: E402

from connito.training.trainer import run_training  # noqa: E402
from tests.helpers import compose_train  # noqa: E402


def zero3_expert_read(model, run_dir: Path, rank: int) -> str | None:
    import deepspeed
    import torch

    from connito.experts import ExpertAddressError, ExpertView

    view = ExpertView(model)
    layer = view.moe_layers[0]
    try:
        view.read_expert((layer, 0))
        refusal = None
    except ExpertAddressError as err:
        refusal = str(err)
    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        expert = view.read_expert((layer, 0))
    if rank == 0:
        torch.save(expert, run_dir / "zero3_expert.pt")
    return refusal


def main() -> None:
    run_dir, overrides = Path(sys.argv[1]), sys.argv[2:]
    result = run_training(compose_train(overrides), run_dir)
    digest = hashlib.sha256()
    for name, tensor in sorted(result.model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    rank = dist.get_rank()
    report = {"sha256": digest.hexdigest(), "steps": result.steps_done}
    if result.engine.zero_optimization_stage() == 3:
        report["zero3_refusal"] = zero3_expert_read(result.model, run_dir, rank)
    (run_dir / f"params_rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
