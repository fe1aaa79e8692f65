"""`connito adapt` end to end on a briefly trained tiny base: ESFT trains exactly the selected experts (every other
expert bit-identical in the exported safetensors), the delta package rebuilds the adapted model, full fine-tuning
moves everything; bad options stop before any work."""

import json

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import load_file

from connito.adaptation.adapt import check_adapt, run_adapt
from connito.adaptation.outcome import AdaptOutcome
from connito.cli.paths import config_dir
from connito.experts.mask_file import read_mask_file
from connito.models import ModelError
from connito.training.trainer import run_training
from tests.helpers import compose_train, small_overrides


def compose_adapt(overrides: list[str]):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return OmegaConf.to_object(compose(config_name="adapt", overrides=overrides))


@pytest.fixture(scope="module")
def base(tmp_path_factory, data_cache):
    run_dir = tmp_path_factory.mktemp("adapt") / "base"
    overrides = small_overrides(data_cache) + ["train.steps=20", "train.eval_every=0", "train.checkpoint_every=0"]
    run_training(compose_train(overrides), run_dir)
    return run_dir / "hf"


def adapt_overrides(data_cache, base, run_root, method: str, steps: int = 6) -> list[str]:
    small = [o for o in small_overrides(data_cache) if o != "analysis=none"]
    return small + [
        f"model.path={base}", f"method={method}", f"train.steps={steps}", "train.checkpoint_every=0",
        f"run.root={run_root}", "esft.analysis_tokens=2048", "outcome.eval_tokens=2048",
    ]  # fmt: skip


def experts_of(path) -> dict[str, torch.Tensor]:
    """The routed experts' tensors as saved (transformers writes one tensor per expert and projection)."""
    return {k: v for k, v in load_file(path / "model.safetensors").items() if ".mlp.experts." in k}


def test_esft_trains_the_selected_experts_and_nothing_else(base, data_cache, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = compose_adapt(adapt_overrides(data_cache, base, tmp_path, "esft"))
    result = run_adapt(cfg, tmp_path / "esft")
    run_dir = tmp_path / "esft"
    mask = read_mask_file(run_dir / "mask.json", base).mask
    assert 0 < len(mask) < 32
    before, after = experts_of(base), experts_of(run_dir / "hf")
    for name, tensor in before.items():  # on disk one tensor per expert: model.layers.<l>.mlp.experts.<e>.<proj>
        layer, expert = int(name.split(".")[2]), int(name.split(".")[5])
        same = torch.equal(tensor, after[name])
        assert same == ((layer, expert) not in mask), f"{name}: selected={(layer, expert) in mask}"
    others = {k: v for k, v in load_file(base / "model.safetensors").items() if k not in before}
    adapted_all = load_file(run_dir / "hf" / "model.safetensors")
    assert all(torch.equal(v, adapted_all[k]) for k, v in others.items())  # routers, attention, embeddings
    record = json.loads((run_dir / "adapt.json").read_text())
    assert record == result.outcome.to_dict() and result.outcome.method == "esft-gate"
    assert AdaptOutcome.load(run_dir) == result.outcome
    assert record["adapted_domains"] == ["code"] and set(record["loss"]) == {"code", "docs", "prose", "wiki"}
    assert record["trainable_params"] < record["total_params"] / 2 and record["delta"]["bytes"] > 0

    from connito.experts.delta import apply_delta

    rebuilt = apply_delta(base, run_dir / "delta", tmp_path / "rebuilt")
    ids = torch.randint(3, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    load = dict(local_files_only=True, dtype=torch.float32)
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(run_dir / "hf", **load)(ids).logits
        got = AutoModelForCausalLM.from_pretrained(rebuilt, **load)(ids).logits
    assert torch.equal(got, expected)


def test_full_fine_tuning_moves_every_expert(base, data_cache, tmp_path):
    cfg = compose_adapt(adapt_overrides(data_cache, base, tmp_path, "full", steps=3))
    result = run_adapt(cfg, tmp_path / "full")
    before, after = experts_of(base), experts_of(tmp_path / "full" / "hf")
    assert all(not torch.equal(before[k], after[k]) for k in before)
    assert result.outcome.trainable_params == result.outcome.total_params


def test_bad_options_stop_before_any_work(base, data_cache, tmp_path):
    def refused(extra: list[str], error, match: str):
        cfg = compose_adapt(adapt_overrides(data_cache, base, tmp_path, "esft") + extra)
        with pytest.raises(error, match=match):
            check_adapt(cfg)

    refused(["method=lora"], ValueError, "method='lora' is not one of full, esft, des_moe")
    refused(["esft.top_p=0"], ValueError, r"esft.top_p=0.0 must be in \(0, 1\]")
    refused(["esft.top_p=1.5"], ValueError, r"must be in \(0, 1\]")
    refused(["esft.score=driver"], ValueError, "esft.score='driver' is not one of gate, token")
    refused([f"model.path={tmp_path / 'nothing'}"], ModelError, "is not a save_pretrained checkpoint")
    refused([f"esft.mask_file={tmp_path / 'none.json'}"], ValueError, "is not a file; write one with `connito select`")
    assert not (tmp_path / "adapt-esft").exists()


def test_adapting_to_files_measures_gain_on_their_domain_and_forgetting_on_the_recipes(base, data_cache, tmp_path):
    """data.source=files: the files' domain is the adapted one (gain on its validation split); the base's recipe
    domains, read beside it, measure the forgetting."""
    import sysconfig
    from pathlib import Path

    sources = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("email/*.py"))[:40]
    rows = [{"text": path.read_text(errors="replace")[:4000], "domain": "mail"} for path in sources]
    data_file = tmp_path / "mail.jsonl"
    data_file.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    overrides = adapt_overrides(data_cache, base, tmp_path, "full", steps=3) + [
        "data.source=files", f"data.files=[{data_file}]", f"data.cache_dir={tmp_path / 'files-cache'}",
    ]  # fmt: skip
    result = run_adapt(compose_adapt(overrides), tmp_path / "files")
    record = result.outcome
    assert record.adapted_domains == ["mail"]
    assert set(record.loss) == {"mail", "code", "docs", "prose", "wiki"}
    assert record.gain == pytest.approx(record.loss["mail"]["base"] - record.loss["mail"]["adapted"])
    others = [record.loss[d]["adapted"] - record.loss[d]["base"] for d in ("code", "docs", "prose", "wiki")]
    assert record.forgetting == pytest.approx(sum(others) / 4)
