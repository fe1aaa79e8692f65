"""DES-MoE on 2 data-parallel gloo ranks: the expert-domain map is summed over the ranks, so both ranks train the
same experts and end with identical parameters. ZeRO-0, where each rank steps its own optimizer, so ranks with
different maps would end with different parameters (the trainer's own rank worker runs it)."""

import json

import pytest

from tests.helpers import REPO, small_overrides, torchrun


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_share_one_map_and_hold_identical_parameters(data_cache, tmp_path):
    overrides = small_overrides(data_cache) + [
        "train.steps=10",
        "train.eval_every=0",
        "train.checkpoint_every=0",
        "engine=zero0",
        "optim.warmup_steps=2",
        "plugins=[connito.adaptation.des_moe]",
        "+callbacks.des_moe.refresh_every=3",
        "+callbacks.des_moe.calibration_rows=4",
    ]
    proc = torchrun(2, REPO / "tests" / "training" / "dist_worker.py", [str(tmp_path / "run"), *overrides])
    assert proc.returncode == 0, proc.stderr[-4000:]
    digests = [json.loads((tmp_path / "run" / f"params_rank{r}.json").read_text()) for r in (0, 1)]
    assert digests[0] == digests[1] and digests[0]["steps"] == 10
    summary = json.loads((tmp_path / "run" / "des_moe_map.json").read_text())
    # warm-up ends at step 2, then every 3 steps (5), and a last time when phase III starts (7): locked from there
    assert summary["refreshes"] == 3 and summary["step"] == 7
    assert any(experts for layers in summary["serves"].values() for experts in layers.values())
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["des_moe/phase"] for r in records if "train/loss" in r] == [1.0] * 2 + [2.0] * 5 + [3.0] * 3
    assert (tmp_path / "run" / "hf" / "des_moe_router.safetensors").is_file()
