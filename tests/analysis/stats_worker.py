"""One rank of the distributed routing-statistics test: train one step, then stream validation rows into
:class:`RoutingStatistics` and all-reduce them.

Usage: torchrun --nproc_per_node 2 tests/analysis/stats_worker.py RUN_DIR [key=value ...]

After ``run_training`` (with ``train.export=true``: rank 0 writes the HF export the test takes its single-process
reference from) every rank streams the same fixed set of :data:`NUM_ROWS` validation rows, spread evenly over the
split, rank r taking rows ``r::world`` in micro-batches of :data:`MICRO_BATCH` (under expert parallelism every rank
runs the same number of forwards: each is an all-to-all). The first token of every row gets domain -1 (ignored).
Each rank writes ``RUN_DIR/stats{r}.pt``: the batches it streamed, its own statistics before the all-reduce and the
global ones after.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

NUM_ROWS = 16
MICRO_BATCH = 2


def main() -> None:
    import torch.distributed as dist

    from connito.analysis.statistics import RoutingStatistics
    from connito.experts import ExpertView
    from connito.routing import RouterObserver
    from connito.training.trainer import run_training
    from tests.helpers import compose_train

    run_dir, overrides = Path(sys.argv[1]), sys.argv[2:]
    result = run_training(compose_train(overrides), run_dir)
    assert result.export_dir is not None, "the run wrote no HF export"
    model, trainer = result.model.eval(), result.trainer
    rank, world = dist.get_rank(), dist.get_world_size()

    split, domains = trainer.val_split, trainer.prepared.domains
    rows = torch.linspace(0, len(split) - 1, NUM_ROWS).round().long().tolist()
    assert len(set(rows)) == NUM_ROWS, f"the validation split has only {len(split)} rows"
    mine = rows[rank::world]
    batches = []
    for start in range(0, len(mine), MICRO_BATCH):
        index = mine[start : start + MICRO_BATCH]
        domain_ids_BS = split.domain_ids_NT[index].clone()
        domain_ids_BS[:, 0] = -1
        batches.append((split.input_ids_NT[index].clone(), domain_ids_BS))

    view = ExpertView(model)
    observer = RouterObserver(model, view)
    stats = RoutingStatistics(view, len(domains), domains)
    subscription = stats.attach(observer)
    with torch.no_grad():
        for input_ids_BS, domain_ids_BS in batches:
            stats.set_domains(domain_ids_BS.reshape(-1))
            model(input_ids=input_ids_BS.to(trainer.engine.device))
    subscription.remove()
    observer.close()
    local = stats.state_dict()
    stats.all_reduce_()
    report = {
        "rank": rank,
        "world_size": world,
        "ep_size": view.ep_size,
        "domains": domains,
        "rows": mine,
        "batches": batches,
        "local": local,
        "global": stats.state_dict(),
    }
    torch.save(report, run_dir / f"stats{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
