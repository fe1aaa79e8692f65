"""``connito remove``: the smaller checkpoint equals the model with those experts opted out; bad input is refused
before anything is written."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from connito.cli.commands.remove import RemoveConfig, parse_experts, run
from connito.models.families import ModelError
from connito.routing.opt_out import OptOut, in_every_layer
from tests.experts.conftest import build_tiny

INPUT_IDS = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(7))


@pytest.fixture
def checkpoint(tmp_path):
    model = build_tiny("qwen3_moe")
    path = tmp_path / "ckpt"
    model.save_pretrained(path)
    return path, model


def test_removing_an_expert_of_every_layer_equals_opting_it_out(checkpoint, tmp_path, capsys):
    path, model = checkpoint
    before = path.stat().st_mtime_ns, sorted(p.name for p in path.iterdir())
    run(RemoveConfig(checkpoint=str(path), experts=["*:3"], out=str(tmp_path / "smaller")), tmp_path)
    assert "written:" in capsys.readouterr().out
    smaller = AutoModelForCausalLM.from_pretrained(tmp_path / "smaller", local_files_only=True).eval()
    assert smaller.config.num_experts == model.config.num_experts - 1
    with torch.no_grad(), OptOut(model, in_every_layer(3)):
        expected = model(INPUT_IDS).logits
    with torch.no_grad():
        assert torch.equal(smaller(INPUT_IDS).logits, expected)
    report = (tmp_path / "smaller" / "remove_report.md").read_text()
    assert "- layer 0: [0, 1, 2, 4, 5, 6, 7]" in report and "Parameters: " in report
    provenance = json.loads((tmp_path / "smaller" / "connito_opt_out.json").read_text())
    assert all(3 not in kept for kept in provenance["kept"].values())
    assert (path.stat().st_mtime_ns, sorted(p.name for p in path.iterdir())) == before  # the input is untouched


def test_layer_expert_ids_and_bad_input(checkpoint, tmp_path):
    assert parse_experts(["1:3", " 2 : 4 "]) == [(1, 3), (2, 4)]
    assert parse_experts(["*:3", "*:5"]) == in_every_layer(3, 5)
    with pytest.raises(ValueError, match=r"'three' is not layer:expert"):
        parse_experts(["three"])
    with pytest.raises(ValueError, match="not both"):
        parse_experts(["*:3", "1:2"])
    path, _ = checkpoint
    with pytest.raises(ModelError, match="missing: out, experts"):
        run(RemoveConfig(checkpoint=str(path)), tmp_path)
    with pytest.raises(ModelError, match=r"removes different numbers of experts from the MoE layers \(layer 0: 1"):
        run(RemoveConfig(checkpoint=str(path), experts=["0:3"], out=str(tmp_path / "uneven")), tmp_path)
    assert not (tmp_path / "uneven").exists()
