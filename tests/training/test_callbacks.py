"""The trainer's callbacks and loss terms, in one process: events, state in checkpoints, and the refusals."""

import json

import pytest
import torch

from connito.training.callbacks import Callback, CallbackError, LossTerm
from connito.training.trainer import run_training
from tests.helpers import compose_train, small_overrides

PROBE = ["plugins=[tests.training.probe_callback]"]


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_records(run_dir) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "train/tokens_per_s"} for r in records(run_dir) if "train/loss" in r]


@pytest.fixture
def base(data_cache):
    return small_overrides(data_cache) + [
        "train.steps=6",
        "train.grad_accum=2",
        "train.eval_every=0",
        "train.checkpoint_every=3",
        "train.export=false",
    ]


def test_a_callback_adds_a_loss_term_hooks_the_engine_and_runs_after_every_step(base, tmp_path):
    plain = run_training(compose_train(base), tmp_path / "plain")
    probed = run_training(compose_train(base + PROBE + ["+callbacks.probe.coef=1.0"]), tmp_path / "probe")
    curve = train_records(tmp_path / "probe")
    assert [r["probe/steps"] for r in curve] == [1, 2, 3, 4, 5, 6]
    assert [r["probe/hook_calls"] for r in curve] == [2, 4, 6, 8, 10, 12]  # one backward per micro-batch
    assert all(r["train/probe_l2"] > 0 for r in curve)
    assert json.loads((tmp_path / "probe" / "probe_hooked.json").read_text()) == {"block": "HFMoEBlock", "ep_size": 1}
    # the term pulls the router weights towards zero: a smaller norm than the same run without it
    router = "model.layers.0.mlp.gate.weight"
    assert probed.model.state_dict()[router].norm() < plain.model.state_dict()[router].norm()


def test_a_zero_coefficient_term_leaves_the_loss_curve_bit_identical(base, tmp_path):
    run_training(compose_train(base), tmp_path / "plain")
    run_training(compose_train(base + PROBE + ["+callbacks.probe.coef=0.0"]), tmp_path / "probe")
    plain, probed = train_records(tmp_path / "plain"), train_records(tmp_path / "probe")
    assert [r["train/loss"] for r in probed] == [r["train/loss"] for r in plain]
    assert [r["train/lr"] for r in probed] == [r["train/lr"] for r in plain]


def test_callback_state_is_saved_with_the_checkpoint_and_restored_on_resume(base, tmp_path):
    common = base + PROBE + ["+callbacks.probe.coef=0.5"]
    run_training(compose_train(common), tmp_path / "straight")
    first = run_training(compose_train(common + ["train.stop_after=4"]), tmp_path / "resumed")
    assert not first.finished
    saved = torch.load(tmp_path / "resumed" / "checkpoints" / "step_000004" / "callback_state.pt", weights_only=True)
    assert saved["probe"]["steps"] == 4 and saved["probe"]["hook_calls"] == 8
    run_training(compose_train(common), tmp_path / "resumed")
    assert train_records(tmp_path / "resumed") == train_records(tmp_path / "straight")


def test_an_unregistered_callback_stops_before_any_work(tmp_path):
    cfg = compose_train(small_overrides(tmp_path / "cache") + ["+callbacks.probez={}"])
    with pytest.raises(CallbackError, match=r"^callback 'probez' is not registered \(registered: .*\)\. Register it"):
        run_training(cfg, tmp_path / "run")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()


def test_a_plugin_that_does_not_import_is_named(tmp_path):
    cfg = compose_train(small_overrides(tmp_path / "cache") + ["plugins=[tests.no_such_module]"])
    with pytest.raises(CallbackError, match=r"^plugins: cannot import 'tests.no_such_module'"):
        run_training(cfg, tmp_path / "run")


def test_bad_callback_options_are_named(tmp_path):
    cfg = compose_train(small_overrides(tmp_path / "cache") + PROBE + ["+callbacks.probe.coeff=1.0"])
    with pytest.raises(CallbackError, match=r"^callback 'probe' \(ProbeCallback\) rejected its options"):
        run_training(cfg, tmp_path / "run")


class VectorTerm(LossTerm):
    name = "vector"

    def __call__(self, batch, outputs):
        return outputs.logits.mean(dim=-1)  # [B, T]: not a scalar


class AddsVectorTerm(Callback):
    def on_engine_built(self, trainer) -> None:
        trainer.add_loss_term(VectorTerm())


def test_a_loss_term_that_is_not_a_scalar_stops_before_the_first_optimizer_step(base, tmp_path):
    with pytest.raises(CallbackError) as err:
        run_training(compose_train(base), tmp_path / "run", callbacks=[AddsVectorTerm()])
    assert str(err.value) == (
        "loss term 'vector' returned (4, 64), not a scalar tensor: reduce it (e.g. .mean()) before returning it"
    )
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # no step was logged


def test_the_export_carries_the_start_checkpoints_provenance_files(tmp_path):
    """A model trained from a composed checkpoint still says what it is made of (connito_*.json)."""
    from connito.training.export import carry_provenance

    start, out = tmp_path / "start", tmp_path / "out"
    start.mkdir()
    out.mkdir()
    (start / "connito_flexolmo.json").write_text('{"role": "owner_start"}')
    (start / "config.json").write_text("{}")
    (out / "connito_btx.json").write_text("written by the run")
    (start / "connito_btx.json").write_text("older")
    assert carry_provenance(start, out) == ["connito_flexolmo.json"]
    assert (out / "connito_flexolmo.json").read_text() == '{"role": "owner_start"}'
    assert (out / "connito_btx.json").read_text() == "written by the run" and not (out / "config.json").exists()
