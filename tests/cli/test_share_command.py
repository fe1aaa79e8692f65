"""``connito share``: the command writes the checkpoint with the picked experts in the shared expert and its
report; missing arguments are named."""

import json

import pytest
from transformers import AutoModelForCausalLM

from connito.cli.commands.share import DistillConfig, ShareConfig, run
from connito.models.families import ModelError
from tests.retirement.test_retirement_sharing import make


def test_share_writes_the_checkpoint_and_its_report(tmp_path, capsys):
    path, model, view, analysis = make(tmp_path, "deepseek_v2")
    cfg = ShareConfig(checkpoint=str(path), analysis_path=str(path / "analysis.json"), per_layer=2,
                      out=str(tmp_path / "shared"), distill=DistillConfig(steps=0), eval_tokens=0)  # fmt: skip
    run(cfg, tmp_path)
    assert "written:" in capsys.readouterr().out
    report = json.loads((tmp_path / "shared" / "share_report.json").read_text())
    assert report["pick"] == "driver" and all(len(v) == 2 for v in report["shared_from"].values())
    shared = AutoModelForCausalLM.from_pretrained(tmp_path / "shared")
    assert shared.config.n_routed_experts == model.config.n_routed_experts - 2
    with pytest.raises(ModelError, match="missing: out"):
        run(ShareConfig(checkpoint=str(path)), tmp_path)
