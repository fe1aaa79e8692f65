"""One rank of the gradient-mask tests: trains each case of a cases file in turn (one process group, one engine per
case) with the ``trainable`` callback, and dumps what the tests check.

Usage: torchrun --nproc_per_node N tests/training/grad_mask_worker.py CASES_JSON

``CASES_JSON``: ``{"out": DIR, "base": [overrides], "dump_steps": [...], "cases": {name: {"overrides": [...],
"freeze_after": {"step": S, "experts": [[layer, expert], ...]}, "stop_after": K}}}`` (``stop_after``: stop after step
K with a checkpoint, then resume in a second run). Per case, in ``DIR/<name>/``: rank 0 writes
``initial.pt`` (the transformers model before the engine), ``step{S}.pt`` after each dump step (the full
transformers state dict, every expert, gathered over the expert-parallel group); every rank writes
``rank{r}.json``: its optimizer-state elements, whether any frozen parameter reached the optimizer, step time.
``freeze_after`` drops experts from the trainable set after step S (``GradientMask.set_trainable``), the way a
method with phases narrows its mask.
"""

import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from connito.experts import ExpertMask  # noqa: E402
from connito.parallel import gather_hf_state_dict  # noqa: E402
from connito.training.callbacks import Callback  # noqa: E402
from connito.training.callbacks.trainable import Trainable  # noqa: E402
from connito.training.optimizer_groups import inner_optimizer  # noqa: E402
from connito.training.trainer import run_training  # noqa: E402
from tests.helpers import compose_train  # noqa: E402


class Dump(Callback):
    """Rank 0 saves the model before the engine and after the dump steps; applies ``freeze_after``."""

    def __init__(self, out: Path, steps: list[int], freeze_after: dict | None):
        self.out, self.steps, self.freeze_after = out, set(steps), freeze_after
        self.step_times: list[float] = []

    def on_model_built(self, trainer, model) -> None:
        if trainer.info.is_main:
            torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, self.out / "initial.pt")

    def on_train_start(self, trainer) -> None:
        self.started = time.perf_counter()

    def on_step_end(self, trainer, losses) -> None:
        now = time.perf_counter()
        self.step_times.append(now - self.started)
        step = trainer.state.step
        if step in self.steps:
            state = gather_hf_state_dict(trainer.engine.module)  # collective
            if trainer.info.is_main:
                torch.save(state, self.out / f"step{step}.pt")
        if self.freeze_after and step == self.freeze_after["step"]:
            callback = next(c for c in trainer.callbacks if isinstance(c, Trainable))
            current = callback.mask.trainable
            experts = ExpertMask(current.experts.mask_LE, current.experts.moe_layers)
            for expert_id in self.freeze_after["experts"]:
                experts.clear(tuple(expert_id))
            callback.mask.set_trainable(dataclasses.replace(current, experts=experts))
        self.started = time.perf_counter()


def optimizer_report(engine) -> dict:
    inner = inner_optimizer(engine)
    frozen = {id(p) for p in engine.module.parameters() if not p.requires_grad}
    held = [p for group in inner.param_groups for p in group["params"]]
    if engine.zero_optimization_stage() in (1, 2):
        held += [p for group in engine.optimizer.bit16_groups for p in group]
    state = [s for s in inner.state.values() if "exp_avg" in s]
    expert = lambda name: ".experts." in name or ".lean_experts." in name  # noqa: E731  (fused or lean slots)
    return {
        "frozen_in_optimizer": sum(id(p) in frozen for p in held),
        "frozen_numel": sum(p.numel() for p in engine.module.parameters() if not p.requires_grad),
        "frozen_expert_tensors": sorted(n for n, p in engine.module.named_parameters()
                                        if expert(n) and not p.requires_grad),
        "trainable_tensor_numel": sum(p.numel() for p in engine.module.parameters() if p.requires_grad),
        "trainable_expert_numel": sum(p.numel() for n, p in engine.module.named_parameters()
                                      if expert(n) and p.requires_grad),
        "fused_expert_numel": sum(p.numel() for n, p in engine.module.named_parameters() if ".experts." in n),
        "lean_slot_numel": sum(p.numel() for n, p in engine.module.named_parameters() if ".lean_experts." in n),
        "exp_avg_numel": sum(s["exp_avg"].numel() for s in state),
        "state_bytes": sum(t.numel() * t.element_size() for s in inner.state.values() for t in s.values()
                           if torch.is_tensor(t)),
        "step_bytes": sum(s["step"].numel() * s["step"].element_size() for s in state
                          if torch.is_tensor(s.get("step"))),
    }  # fmt: skip


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(spec["out"])
    for name, case in spec["cases"].items():
        case_dir = out / name
        case_dir.mkdir(parents=True, exist_ok=True)
        dump = Dump(case_dir, spec["dump_steps"], case.get("freeze_after"))
        overrides = spec["base"] + case["overrides"]
        if case.get("stop_after"):  # stop (checkpointing) after that many steps, then resume to the end
            first = run_training(compose_train(overrides + [f"train.stop_after={case['stop_after']}"]),
                                 case_dir / "run", callbacks=[dump])  # fmt: skip
            assert not first.finished
        result = run_training(compose_train(overrides), case_dir / "run", callbacks=[dump])
        rank = dist.get_rank()
        report = optimizer_report(result.engine)
        report["step_time"] = sorted(dump.step_times)[len(dump.step_times) // 2]
        (case_dir / f"rank{rank}.json").write_text(json.dumps(report))
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
