"""One rank of a multi-process training test: trains with the given overrides, then writes a digest of its
parameters so the test can check that every rank holds the same model.

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


def main() -> None:
    run_dir, overrides = Path(sys.argv[1]), sys.argv[2:]
    result = run_training(compose_train(overrides), run_dir)
    digest = hashlib.sha256()
    for name, tensor in sorted(result.model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    rank = dist.get_rank()
    (run_dir / f"params_rank{rank}.json").write_text(
        json.dumps({"sha256": digest.hexdigest(), "steps": result.steps_done})
    )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
