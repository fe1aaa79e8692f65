"""One rank of the non-shared checkpoint directory test: rank 0 trains into RUN_DIR_0, every other rank into
RUN_DIR_1, as two nodes whose run.root is a local disk each (same path, different contents) would.

Usage: torchrun --nproc_per_node 2 tests/training/split_dir_worker.py RUN_DIR_0 RUN_DIR_1 [key=value ...]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch.distributed as dist  # noqa: E402

from connito.training.distributed import init_distributed  # noqa: E402
from connito.training.trainer import run_training  # noqa: E402
from tests.helpers import compose_train  # noqa: E402


def main() -> None:
    dirs, overrides = [Path(sys.argv[1]), Path(sys.argv[2])], sys.argv[3:]
    rank = init_distributed().rank
    run_training(compose_train(overrides), dirs[min(rank, 1)])
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
