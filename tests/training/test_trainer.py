"""Single-process training through the real DeepSpeed engine (gloo, CPU, fp32)."""

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from connito.data import prepare_data
from connito.data.packed import PackedSplit
from connito.models import ModelError
from connito.training.callbacks import Callback, CallbackError
from connito.training.evaluation import evaluate_by_domain
from connito.training.trainer import run_training
from tests.helpers import assert_same_final_state, compose_train, small_overrides


def losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in records if "train/loss" in r]


def test_loss_falls_table_and_hf_export_reloads_with_identical_logits(data_cache, tmp_path):
    cfg = compose_train(
        small_overrides(data_cache)
        + ["train.steps=40", "train.eval_every=0", "train.checkpoint_every=0", "train.eval_batches=0"]
    )
    result = run_training(cfg, tmp_path / "run")

    assert result.finished and result.steps_done == 40
    curve = losses(tmp_path / "run")
    assert len(curve) == 40
    assert sum(curve[-5:]) / 5 < curve[0] - 0.5, curve  # ln(512) = 6.24 at init
    assert set(result.validation) == {"code", "docs", "prose", "wiki", "all"}
    # The reported numbers are the model's: the exported model, scored independently, gives them again ...
    prepared = prepare_data(cfg.data, progress=False)
    reloaded = AutoModelForCausalLM.from_pretrained(result.export_dir, local_files_only=True).eval()
    split = PackedSplit.from_dataset(prepared.load_split("validation"))
    recomputed = evaluate_by_domain(reloaded, split, prepared.domains, 4, 0, 0, 1, torch.device("cpu"))
    assert recomputed == pytest.approx(result.validation, rel=1e-6)
    # ... and 40 steps learned: far below the uniform guess ln(512) = 6.24, and no further from the unigram floor
    # than an untrained model is.
    assert result.validation["all"] < math.log(512) - 0.6, result.validation
    assert result.validation["all"] - result.unigram["all"] < 0.3, (result.validation, result.unigram)

    trained = result.model.eval()
    input_ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=input_ids).logits, trained(input_ids=input_ids).logits)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["hf_export"] == str(result.export_dir)
    assert (result.export_dir / "tokenizer.json").is_file()


def test_resume_after_interrupt_gives_a_bit_identical_loss_curve(data_cache, tmp_path):
    common = small_overrides(data_cache) + ["train.steps=8", "train.checkpoint_every=4", "train.eval_every=0"]
    straight = run_training(compose_train(common), tmp_path / "straight")

    first = run_training(compose_train(common + ["train.stop_after=3"]), tmp_path / "interrupted")
    assert not first.finished and first.steps_done == 3
    assert (tmp_path / "interrupted" / "checkpoints" / "latest").read_text() == "step_000003"
    second = run_training(compose_train(common), tmp_path / "interrupted")  # train.resume=auto
    assert second.finished

    assert losses(tmp_path / "interrupted") == losses(tmp_path / "straight")
    expected = straight.model.state_dict()
    for name, value in second.model.state_dict().items():
        assert torch.equal(value, expected[name]), name
    assert_same_final_state(tmp_path / "straight", tmp_path / "interrupted")  # AdamW state and export too


def test_resume_never_refuses_a_run_directory_with_checkpoints(data_cache, tmp_path):
    common = small_overrides(data_cache) + ["train.steps=2", "train.eval_every=0", "train.export=false"]
    run_training(compose_train(common), tmp_path / "run")
    with pytest.raises(ValueError, match="already holds checkpoints and train.resume=never"):
        run_training(compose_train(common + ["train.resume=never"]), tmp_path / "run")


def test_model_path_that_is_not_a_checkpoint_stops_before_any_data_work(tmp_path):
    (tmp_path / "notamodel").mkdir()
    cfg = compose_train(small_overrides(tmp_path / "cache") + [f"model.path={tmp_path / 'notamodel'}"])
    with pytest.raises(ModelError, match="is not a Hugging Face checkpoint: it has no config.json"):
        run_training(cfg, tmp_path / "run")
    assert not (tmp_path / "cache").exists()


def test_fine_tuning_a_local_checkpoint_starts_from_its_weights_and_tokenizer(data_cache, tmp_path):
    base = small_overrides(data_cache) + ["train.eval_every=0", "train.checkpoint_every=0", "train.eval_batches=0"]
    first = run_training(compose_train(base + ["train.steps=30"]), tmp_path / "pretrain")
    # lr 0: the step changes nothing, so the model must score the validation split exactly as the export did,
    # which holds only if both the weights and the tokenizer (hence the same packed rows) carried over.
    cfg = compose_train(base + ["train.steps=1", "optim.lr=0", f"model.path={first.export_dir}", "data.vocab_size=300"])
    tuned = run_training(cfg, tmp_path / "finetune")
    assert tuned.validation == pytest.approx(first.validation, rel=1e-6)
    assert tuned.trainer.cfg.data.tokenizer_path == str(first.export_dir), "the run's own config names the tokenizer"
    assert not cfg.data.tokenizer_path, "the caller's config is left as it was"
    assert tuned.validation["all"] < 6.0  # a trained model, not ln(512) = 6.24
    assert len(AutoModelForCausalLM.from_pretrained(tuned.export_dir).get_input_embeddings().weight) == len(
        first.model.get_input_embeddings().weight
    )


@pytest.mark.parametrize(
    "model", sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "configs" / "model").glob("*.yaml"))
)
def test_every_model_config_trains_through_the_engine(data_cache, tmp_path, model):
    overrides = small_overrides(data_cache) + [
        f"model={model}",
        "train.steps=8",
        "optim.warmup_steps=2",
        "train.eval_every=0",
        "train.checkpoint_every=0",
        "train.export=false",
    ]
    result = run_training(compose_train(overrides), tmp_path / "run")
    curve = losses(tmp_path / "run")
    assert result.finished and len(curve) == 8
    assert curve[-1] < curve[0] - 0.05, curve


@pytest.mark.parametrize("model", ["llama_tiny", "qwen3_tiny"])
def test_a_dense_model_trains_and_exports_through_the_same_trainer(data_cache, tmp_path, model):
    """The seeds and branches of branch-train-mix: no experts, no load-balancing term, the same loop and export."""
    cfg = compose_train(
        small_overrides(data_cache)
        + [f"model={model}", "train.steps=12", "optim.warmup_steps=2", "train.eval_every=0", "train.checkpoint_every=0"]
    )
    result = run_training(cfg, tmp_path / "run")
    curve = losses(tmp_path / "run")
    assert result.finished and curve[-1] < curve[0] - 0.3, curve
    assert [t.name for t in result.trainer.loss_terms] == []
    reloaded = AutoModelForCausalLM.from_pretrained(result.export_dir, local_files_only=True).eval()
    assert reloaded.config.model_type == model.removesuffix("_tiny")
    input_ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=input_ids).logits, result.model.eval()(input_ids=input_ids).logits)


def test_a_dense_model_trains_only_the_parameters_trainable_modules_names(data_cache, tmp_path):
    """callbacks.trainable on a model without routed experts (a seed, a BTS model): named tensors train, the rest
    stays bit-identical; expert options are refused with the fix."""
    base = small_overrides(data_cache) + ["model=llama_tiny", "train.steps=3", "train.eval_every=0"]
    named = ["+callbacks.trainable.experts=[]", "+callbacks.trainable.modules=[model.layers.1.mlp.*]"]

    class Initial(Callback):
        def on_engine_built(self, trainer):
            self.state = {k: v.detach().clone() for k, v in trainer.engine.module.state_dict().items()}

    initial = Initial()
    result = run_training(compose_train(base + named), tmp_path / "run", callbacks=[initial])
    before, after = initial.state, result.model.state_dict()
    moved = {k for k in after if not torch.equal(after[k], before[k])}
    assert moved == {f"model.layers.1.mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")}
    record = json.loads((tmp_path / "run" / "trainable.json").read_text())
    assert record["dense"] and record["trainable_numel"] == 3 * 128 * 256
    with pytest.raises(CallbackError, match=r"llama is a dense model .* callbacks.trainable.modules="):
        run_training(compose_train(base + ["+callbacks.trainable.experts=[[0,0]]"]), tmp_path / "bad")
