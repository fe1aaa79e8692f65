"""``connito merge``: similar experts merged down to ``keep`` per layer (by co-activation from the analysis or by
weights), a report written, the input checkpoint untouched; bad input refused before anything is written."""

import hashlib
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from connito.cli.commands.merge import ExpertMergeConfig, run
from connito.experts import ExpertView
from connito.models.families import ModelError
from tests.experts.conftest import build_tiny
from tests.retirement.test_retirement_pruning import analysis_of

INPUT_IDS = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(7))


def digest(path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def checkpoint(tmp_path):
    """A tiny checkpoint whose analysis says experts 0 and 1 always fire together (and expert 1 is used most),
    expert 2 and 3 likewise; the others are independent."""
    model = build_tiny("qwen3_moe")
    path = tmp_path / "ckpt"
    model.save_pretrained(path)
    view = ExpertView(model)
    E = view.num_experts
    usage = [[0.1, 0.3, 0.2, 0.1] + [0.3 / (E - 4)] * (E - 4) for _ in view.moe_layers]
    record = analysis_of(path, model, usage, usage)
    coactivation = [[0.05] * E for _ in range(E)]
    for i, j in ((0, 1), (2, 3)):
        coactivation[i][j] = coactivation[j][i] = 0.9
    record["coactivation"] = [coactivation for _ in view.moe_layers]
    (path / "analysis").mkdir()
    (path / "analysis" / "analysis.json").write_text(json.dumps(record))
    return path, model, view


def test_merging_by_coactivation_writes_a_smaller_checkpoint_and_a_report(checkpoint, tmp_path, capsys):
    path, model, view = checkpoint
    before = digest(path)
    out = tmp_path / "merged"
    run(ExpertMergeConfig(checkpoint=str(path), keep=view.num_experts - 2, out=str(out), eval_tokens=0), tmp_path)
    assert "written:" in capsys.readouterr().out
    record = json.loads((out / "merge_report.json").read_text())
    # the co-activated pairs merge, each into its most-used member (1, then 2 by the tie's lower index)
    assert record["groups"] == [[layer, *pair] for layer in view.moe_layers for pair in ((1, 0), (2, 3))]
    assert record["shares"][0] == pytest.approx([0.75, 0.25])
    merged = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert merged.config.num_experts == view.num_experts - 2
    with torch.no_grad():
        assert torch.isfinite(merged(INPUT_IDS).logits).all()
    assert (out / "merge_report.md").read_text().startswith("# Merged to 6 experts per MoE layer")
    assert json.loads((out / "connito_merge.json").read_text())["kept"]["0"] == [1, 2, 4, 5, 6, 7]
    assert digest(path) == before  # the input is untouched


def test_explicit_groups_and_weight_similarity_need_no_analysis(checkpoint, tmp_path):
    path, _, view = checkpoint
    (path / "analysis" / "analysis.json").unlink()
    groups = [[layer, 4, 5] for layer in view.moe_layers]
    run(ExpertMergeConfig(checkpoint=str(path), groups=groups, frequency="uniform", out=str(tmp_path / "a"),
                          eval_tokens=0), tmp_path)  # fmt: skip
    assert json.loads((tmp_path / "a" / "merge_report.json").read_text())["groups"] == groups
    run(ExpertMergeConfig(checkpoint=str(path), keep=4, similarity="weight", frequency="uniform",
                          out=str(tmp_path / "b"), eval_tokens=0), tmp_path)  # fmt: skip
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "b", local_files_only=True).config.num_experts == 4


def test_bad_input_is_refused_before_anything_is_written(checkpoint, tmp_path):
    path, _, view = checkpoint
    with pytest.raises(ModelError, match="missing: out"):
        run(ExpertMergeConfig(checkpoint=str(path), keep=4), tmp_path)
    with pytest.raises(ModelError, match="not both"):
        run(ExpertMergeConfig(checkpoint=str(path), keep=4, groups=[[0, 1, 2]], out=str(tmp_path / "x")), tmp_path)
    with pytest.raises(ModelError, match="merge down to between top-k"):
        run(ExpertMergeConfig(checkpoint=str(path), keep=1, out=str(tmp_path / "x"), eval_tokens=0), tmp_path)
    with pytest.raises(ModelError, match=r"^keep=0: merge down to between top-k \(2\) and 7 experts per layer"):
        run(ExpertMergeConfig(checkpoint=str(path), keep=0, out=str(tmp_path / "x"), eval_tokens=0), tmp_path)
    with pytest.raises(ModelError, match="merging an expert with itself"):
        groups = [[layer, 3, 3] for layer in view.moe_layers]
        run(ExpertMergeConfig(checkpoint=str(path), groups=groups, out=str(tmp_path / "x"), eval_tokens=0), tmp_path)
    other = tmp_path / "other"
    build_tiny("qwen3_moe", seed=1).save_pretrained(other)
    with pytest.raises(ModelError, match="analyses another checkpoint"):
        run(ExpertMergeConfig(checkpoint=str(other), analysis_path=str(path / "analysis"), keep=4,
                              out=str(tmp_path / "x"), eval_tokens=0), tmp_path)  # fmt: skip
    assert not (tmp_path / "x").exists()
