"""One rank of an expert-parallel test: trains with the given overrides, then writes what the test checks.

Usage: torchrun --nproc_per_node N tests/parallel/ep_worker.py RUN_DIR [key=value ...]

Writes ``RUN_DIR/rank{r}.json``: parameters and AdamW state elements this rank holds, the full model's
non-expert / per-expert counts; (rank 0) ``RUN_DIR/logits.pt``: the trained model's logits on a fixed batch; and
(rank 0) ``RUN_DIR/grads.pt``: after training, the gradients of one more step's loss (the rows every rank would read
at that step, reduced by DeepSpeed as for an update) as a full transformers-named dict, every expert included.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from connito.data import prepare_data  # noqa: E402
from connito.data.packed import PackedSplit  # noqa: E402
from connito.experts import ExpertView  # noqa: E402
from connito.parallel import autoep_layers, gather_hf_state_dict, local_parameter_count  # noqa: E402
from connito.training.batches import StepSampler  # noqa: E402
from connito.training.step import forward_loss, micro_batch  # noqa: E402
from connito.training.trainer import run_training  # noqa: E402
from tests.helpers import compose_train  # noqa: E402


def optimizer_state_numel(model: torch.nn.Module, optimizer) -> int:
    """Elements of AdamW's exp_avg over the parameters this rank holds (ZeRO 0: the client optimizer)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    held = {id(p) for p in model.parameters()}
    total = 0
    for group in inner.param_groups:
        for p in group["params"]:
            state = inner.state.get(p, {})
            if "exp_avg" in state:
                assert id(p) in held, "optimizer state for a parameter the model no longer holds"
                total += state["exp_avg"].numel()
    return total


def next_step_gradients(cfg, result, rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """Backward (no update) of the loss of step ``cfg.train.steps`` through the engine, with the run's own loss
    terms (the load-balancing loss included), gathered in global numbering.

    Collective. Each parameter's data is swapped for its gradient while ``gather_hf_state_dict`` reads the model.
    """
    engine = result.engine
    split = PackedSplit.from_dataset(prepare_data(cfg.data, progress=False).load_split("train"))
    sampler = StepSampler(len(split), cfg.train.micro_batch_size, 1, world_size, rank, cfg.train.seed)
    engine.train()
    loss, _, _ = forward_loss(
        engine, micro_batch(split, sampler, cfg.train.steps, 0, engine.device), result.trainer.loss_terms
    )
    engine.backward(loss)
    params = list(engine.module.parameters())
    saved = [p.data for p in params]
    try:
        for p in params:
            p.data = p.grad if p.grad is not None else torch.zeros_like(p.data)
        grads = gather_hf_state_dict(engine.module)
    finally:
        for p, data in zip(params, saved):
            p.data = data
    return {k: v for k, v in grads.items() if not k.endswith("e_score_correction_bias")}  # a buffer, no gradient


def main() -> None:
    run_dir, overrides = Path(sys.argv[1]), sys.argv[2:]
    cfg = compose_train(overrides)
    result = run_training(cfg, run_dir)
    model = result.model
    rank = dist.get_rank()

    layers = autoep_layers(model)
    report = {"steps": result.steps_done, "params": local_parameter_count(model), "autoep_layers": len(layers)}
    report["local_experts"] = sorted({layer.num_local_experts for layer in layers.values()})
    if result.export_dir is not None:
        from transformers import AutoModelForCausalLM

        full = AutoModelForCausalLM.from_pretrained(result.export_dir, dtype=torch.float32)
        count = ExpertView(full).count_parameters()
        report.update(non_expert=count.non_expert, per_expert=count.per_expert, routed=count.num_routed_experts)
    report["optimizer_state"] = optimizer_state_numel(model, result.engine.optimizer)
    (run_dir / f"rank{rank}.json").write_text(json.dumps(report))

    torch.manual_seed(1234)
    input_ids = torch.randint(0, model.config.vocab_size, (2, 16))
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits  # collective under expert parallelism
    if rank == 0:
        torch.save({"input_ids": input_ids, "logits": logits.cpu()}, run_dir / "logits.pt")
    if cfg.engine.zero_stage == 0:  # ZeRO 1/2 keep gradients in flat partitions, not in param.grad
        grads = next_step_gradients(cfg, result, rank, dist.get_world_size())
        if rank == 0:
            torch.save(grads, run_dir / "grads.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
