"""One rank of the expert-view and router-observation tests: trains one step, then writes what the tests check.

Usage: torchrun --nproc_per_node N tests/experts/view_worker.py RUN_DIR [key=value ...]

After ``run_training`` (with ``train.export=true``) every rank builds ``ExpertView(result.model)`` and writes
``RUN_DIR/rank{r}.pt``: the view's layout facts (MoE layers, experts, owners, what it holds, parameter counts,
choice biases, shared experts), every expert as ``read_expert`` returns it (called for every id in the same order on
every rank: a collective under expert parallelism), and a router-observation report on this rank's own tokens
(:func:`tests.routing.observe_worker.routing_report`). Then every rank writes known tensors into one expert held by
the last expert-parallel rank; rank 0 writes ``RUN_DIR/write.pt``: the gathered transformers state dict before and
after, and the tensors written.

The tests launch it through :func:`view_run`: one torchrun per (family, layout) per session, shared by the
expert-view tests and the router-observation tests.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from connito.training.callbacks import Callback  # noqa: E402

# DeepSeek routers sit near ties at the default init (std 0.02): a wider init keeps the decisions well separated
# (see tests/parallel/test_parallel_ep.py). DeepSeek-V3 routes group-limited here (2 groups, 1 kept).
FAMILY_OVERRIDES = {
    "qwen3_moe": ["model=qwen3_moe_tiny"],
    "qwen2_moe": ["model=qwen2_moe_tiny"],
    "mixtral": ["model=mixtral_tiny"],
    "olmoe": ["model=olmoe_tiny"],
    "flex_olmo": ["model=flex_olmo_tiny"],
    "deepseek_v2": ["model=deepseek_v2_tiny", "+model.hf_config.initializer_range=0.1"],
    "deepseek_v3": [
        "model=deepseek_v3_tiny",
        "+model.hf_config.initializer_range=0.1",
        "model.hf_config.n_group=2",
        "model.hf_config.topk_group=1",
        # the routing checks compare against the random choice bias the worker sets: keep the bias update off
        "model.expert_bias_update_rate=0",
    ],
}
LAYOUTS = {"ep1": (1, 1), "ep2": (2, 2), "ep2xdp2": (4, 2)}
"""Layout name -> (ranks, parallel.ep_size)."""
CHOICE_BIAS_SCALE = 0.1

_RUNS: dict[tuple[str, str], Path] = {}


def view_run(family: str, layout: str, root: Path, data_cache: Path) -> Path:
    """The run directory of (family, layout), trained on first use (later calls reuse it, whatever ``root``)."""
    from tests.helpers import REPO, small_overrides, torchrun

    key = (family, layout)
    if key not in _RUNS:
        ranks, ep_size = LAYOUTS[layout]
        run_dir = root / f"{family}-{layout}"
        args = small_overrides(data_cache) + [
            "train.steps=1",
            "train.eval_every=0",
            "train.eval_batches=1",
            "train.checkpoint_every=0",
            "train.micro_batch_size=2",
            "train.export=true",
            f"parallel.ep_size={ep_size}",
            *FAMILY_OVERRIDES[family],
        ]
        proc = torchrun(ranks, REPO / "tests" / "experts" / "view_worker.py", [str(run_dir), *args], timeout=900)
        assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-8000:])
        _RUNS[key] = run_dir
    return _RUNS[key]


class DistinctChoiceBias(Callback):
    """Give every choice bias (DeepSeek-V3's ``e_score_correction_bias``, zeros by default) distinct non-zero values
    per layer, through the modules themselves (not the view), so that reading the wrong layer's bias, or routing
    without it, shows."""

    def on_engine_built(self, trainer) -> None:
        from connito.experts import decoder_layers

        for index, layer in enumerate(decoder_layers(trainer.engine.module)):
            mlp = layer.mlp
            router = mlp.router if hasattr(mlp, "router") else getattr(mlp, "gate", None)
            bias = getattr(router, "e_score_correction_bias", None)
            if isinstance(bias, torch.Tensor):
                generator = torch.Generator().manual_seed(100 + index)
                with torch.no_grad():
                    bias.copy_(CHOICE_BIAS_SCALE * torch.randn(bias.shape, generator=generator))


def main() -> None:
    import torch.distributed as dist

    from connito.experts import ExpertView
    from connito.parallel import gather_hf_state_dict
    from connito.training.trainer import run_training
    from tests.helpers import compose_train
    from tests.routing.observe_worker import read_all_experts, routing_report

    run_dir, overrides = Path(sys.argv[1]), sys.argv[2:]
    cfg = compose_train(overrides)
    result = run_training(cfg, run_dir, callbacks=[DistinctChoiceBias()])
    assert result.export_dir is not None, "the run wrote no HF export"
    model = result.model.eval()
    rank = dist.get_rank()

    view = ExpertView(model)
    experts = read_all_experts(view)  # collective: every rank, every id, same order
    ids = list(experts)
    report = {
        "rank": rank,
        "world_size": dist.get_world_size(),
        "ep_size": view.ep_size,
        "ep_rank": view.ep_rank,
        "moe_layers": view.moe_layers,
        "num_experts": view.num_experts,
        "owner": {i: view.owner(i) for i in ids},
        "holds": {i: view.holds(i) for i in ids},
        "count": tuple(view.count_parameters()),
        "read": experts,
        "choice_bias": {
            layer: None if view.choice_bias(layer) is None else view.choice_bias(layer).detach().clone()
            for layer in view.moe_layers
        },
        "shared_experts": {layer: view.shared_experts(layer) is not None for layer in view.moe_layers},
        "shared_expert_gate": {layer: view.shared_expert_gate(layer) is not None for layer in view.moe_layers},
    }

    generator = torch.Generator().manual_seed(1234 + rank)  # each rank routes its own tokens
    input_ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=generator)
    report["routing"] = routing_report(model, view, experts, input_ids)

    # Write one expert of the last MoE layer held by the last expert-parallel rank, then gather again.
    target = (view.moe_layers[-1], (view.ep_size - 1) * (view.num_experts // view.ep_size) + 1)
    before = gather_hf_state_dict(model)  # collective
    generator = torch.Generator().manual_seed(99)  # the same tensors on every rank
    written = {
        name: torch.randn(t.shape, generator=generator, dtype=t.dtype) for name, t in sorted(experts[target].items())
    }
    view.write_expert(target, written)
    after = gather_hf_state_dict(model)  # collective
    report["read_after_write"] = view.read_expert(target)  # collective
    report["write_target"] = target
    torch.save(report, run_dir / f"rank{rank}.pt")
    if rank == 0:
        torch.save({"expert": target, "written": written, "before": before, "after": after}, run_dir / "write.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
