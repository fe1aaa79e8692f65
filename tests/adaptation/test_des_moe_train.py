"""DES-MoE on the trainer, on the tiny Qwen3-MoE: each phase trains exactly the set it names (everything else
bit-identical through every optimizer step, AdamW's decay and momentum included), the distillation weight follows
its schedule, the loss falls, the HF export loads in plain transformers and the sidecar restores the trained
routing, a resumed run repeats the uninterrupted one; refusals before training."""

import json
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from connito.adaptation.des_moe import DesMoe
from connito.adaptation.des_moe.export import MANIFEST, load_adaptive_router
from connito.training.callbacks import Callback, CallbackError
from connito.training.trainable_set import resolve_masks
from connito.training.trainer import run_training
from tests.helpers import compose_train, small_overrides

STEPS = 16  # phases: I steps 0-2, II 3-10, III 11-15; map at step 3, refreshed at 7, 11, 15


class Recorder(Callback):
    """Parameters before the first step and after each, the trainable set and the loss weights of each step."""

    name = "recorder"

    def on_train_start(self, trainer) -> None:
        self.des = next(c for c in trainer.callbacks if isinstance(c, DesMoe))
        self.model = trainer.engine.module
        self.snapshots = [self.snapshot()]
        self.sets, self.kd_coefs, self.task_weights = [], [], []

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().clone() for name, p in self.model.named_parameters()}

    def on_micro_batch(self, trainer, batch) -> None:
        if batch.micro_step == 0:
            self.sets.append(self.des.mask.trainable)
            self.kd_coefs.append(self.des.kd.coef)
            self.task_weights.append(trainer.task_loss_weight)

    def on_step_end(self, trainer, losses) -> None:
        self.snapshots.append(self.snapshot())


def overrides(cache) -> list[str]:
    return small_overrides(cache) + [
        f"train.steps={STEPS}",
        "train.eval_every=0",
        "train.checkpoint_every=0",
        "optim.warmup_steps=2",
        "plugins=[connito.adaptation.des_moe]",
        "+callbacks.des_moe.refresh_every=4",
        "+callbacks.des_moe.calibration_rows=8",
    ]


def train_records(run_dir) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "train/tokens_per_s"} for r in records if "train/loss" in r]


@pytest.fixture(scope="module")
def run(data_cache, tmp_path_factory):
    recorder = Recorder()
    run_dir = tmp_path_factory.mktemp("des_moe") / "run"
    result = run_training(compose_train(overrides(data_cache)), run_dir, callbacks=[recorder])
    return SimpleNamespace(result=result, recorder=recorder, records=train_records(run_dir))


def test_each_phase_trains_exactly_the_set_it_names(run):
    recorder = run.recorder
    model, des = recorder.model, recorder.des
    assert des.plan.starts == (3, 11) and len(recorder.sets) == STEPS
    backbone = {name for names in des.backbone.values() for name in names}
    routers = {n for n, _ in model.named_parameters() if ".mlp.gate." in n}
    experts = {n for n, _ in model.named_parameters() if ".mlp.experts." in n}
    assert backbone and routers and experts and not backbone & (routers | experts)
    changed_in_phase = [set(), set(), set()]
    for step, trainable in enumerate(recorder.sets):
        phase = des.plan.phase_at(step)
        # the set of each phase is the one its parts name (the experts: the map's, after the warm-up)
        assert trainable.routers == (phase < 2)
        assert set(trainable.modules) == (backbone if phase == 0 else set())
        assert (len(trainable.experts) > 0) == (phase > 0)
        before, after = recorder.snapshots[step], recorder.snapshots[step + 1]
        for mask in resolve_masks(model, trainable):
            moved_R = (before[mask.name] != after[mask.name]).reshape(mask.rows, -1).any(dim=1)
            nonzero_R = before[mask.name].reshape(mask.rows, -1).any(dim=1)
            # nothing outside the set moves, not by decay, not by momentum
            assert not (moved_R & ~mask.keep_R).any(), f"step {step} moved frozen rows of {mask.name}"
            if mask.param.dim() >= 2:  # matrices are decayed: every trainable non-zero row moves each step
                assert torch.equal(moved_R & nonzero_R, mask.keep_R & nonzero_R), f"step {step}: {mask.name}"
            if moved_R.any():
                changed_in_phase[phase].add(mask.name)
    assert changed_in_phase[0] == backbone | routers  # I: router (with its MLP) and backbone, experts frozen
    assert routers <= changed_in_phase[1] <= routers | experts and experts & changed_in_phase[1]  # II
    assert experts & changed_in_phase[2] and changed_in_phase[2] <= experts  # III: the domains' experts only
    # the experts trained after the warm-up are those the map allows, and the map moved the set
    expert_sets = [s.experts for s in recorder.sets[3:]]
    assert all(len(s) < 8 * 4 for s in expert_sets) and len({tuple(s.ids()) for s in expert_sets}) > 1


def test_the_distillation_weight_follows_its_schedule_and_the_task_loss_gets_the_rest(run):
    recorder = run.recorder
    expected = [max(0.0, 1.0 - step / STEPS) for step in range(STEPS)]
    assert recorder.kd_coefs == pytest.approx(expected, abs=1e-12)
    assert recorder.task_weights == pytest.approx([1.0 - lam for lam in expected], abs=1e-12)
    assert [r["des_moe/lambda"] for r in run.records] == pytest.approx(expected, abs=1e-12)
    assert [r["des_moe/phase"] for r in run.records] == [1.0] * 3 + [2.0] * 8 + [3.0] * 5
    kd = [r["train/des_moe_kd"] for r in run.records]
    assert kd[0] == 0.0 and max(kd) > 0  # the adaptive router starts as the pretrained one, then moves


def test_a_short_des_moe_run_lowers_the_loss(run):
    losses = [r["train/loss"] for r in run.records]
    assert sum(losses[-3:]) / 3 < losses[0] - 0.1, losses
    assert run.result.finished and run.result.validation["all"] < losses[0]


def test_the_export_loads_in_plain_transformers_and_the_sidecar_restores_the_trained_routing(run):
    export_dir = run.result.export_dir
    manifest = json.loads((export_dir / MANIFEST).read_text())
    folds = manifest["folds"]
    assert [f["layer"] for f in folds] == [0, 1, 2, 3] and all(not f["exact"] for f in folds)
    assert all(0.5 < f["topk_agreement"] <= 1.0 and f["tokens"] == 8 * 64 for f in folds)
    assert manifest["map"]["active_domains"] == list(run.recorder.des.domain_names)
    plain, info = AutoModelForCausalLM.from_pretrained(export_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    trained = run.result.model.eval()
    ids = run.result.trainer.val_split.input_ids_NT[:2]
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
        approximated = plain.eval()(input_ids=ids).logits
        load_adaptive_router(plain, export_dir)
        restored = plain(input_ids=ids).logits
    torch.testing.assert_close(restored, expected, rtol=0, atol=1e-5)
    assert (approximated - expected).abs().max() > (restored - expected).abs().max()


def test_a_resumed_run_repeats_the_uninterrupted_one(run, data_cache, tmp_path):
    """The map (with its window's counts) comes back from the checkpoint; phase and mask follow from it and the step."""
    first = run_training(compose_train(overrides(data_cache) + ["train.stop_after=6"]), tmp_path / "run")
    assert not first.finished and first.steps_done == 6
    saved = torch.load(tmp_path / "run" / "checkpoints" / "step_000006" / "callback_state.pt", weights_only=True)
    assert saved["des_moe"]["map"]["refreshes"] == 1 and int(saved["des_moe"]["map"]["tokens_D"].sum()) > 0
    run_training(compose_train(overrides(data_cache)), tmp_path / "run")
    assert train_records(tmp_path / "run") == run.records


def fake_trainer(ep_size: int = 1, callbacks=()):
    cfg = SimpleNamespace(parallel=SimpleNamespace(ep_size=ep_size), train=SimpleNamespace(steps=10))
    return SimpleNamespace(cfg=cfg, callbacks=list(callbacks), prepared=SimpleNamespace(domains=("code", "docs")))


def test_des_moe_refuses_expert_parallelism_a_second_mask_and_unknown_domains():
    with pytest.raises(CallbackError, match=r"needs parallel.ep_size=1, not 2: DeepSpeed AutoEP rebuilds each router"):
        DesMoe().on_model_built(fake_trainer(ep_size=2), None)
    from connito.training.callbacks.trainable import Trainable

    with pytest.raises(CallbackError, match="decides what trains .*; remove callbacks.trainable"):
        DesMoe().on_model_built(fake_trainer(callbacks=[Trainable(experts=[])]), None)
    with pytest.raises(CallbackError, match=r"domains: \['math'\] are not domains of the data \(\['code', 'docs'\]\)"):
        DesMoe(domains=["math"]).on_model_built(fake_trainer(), None)
    with pytest.raises(TypeError, match="unexpected keyword argument 'temperature'"):
        DesMoe(temperature=0.5)
