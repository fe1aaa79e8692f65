"""The retirement records (prune/merge/share reports, connito_share.json, progressive_prune.json): one class per
kind, the file byte for byte as the writers wrote it before the classes (json.dumps(record, indent=1) + newline),
read by field, another kind or a newer version refused naming the file, the schemas and the fix."""

import json

import pytest

from connito.retirement.records import MergeReport, ProgressivePruneRecord, PruneReport, ShareRecord, ShareReport
from tests.common.record_contract import check_record_kind, indented

LOSS = {"original": {"code": 2.5, "all": 2.5}, "pruned to 2": {"code": 2.75, "all": 2.75}}
PRUNE = {
    "schema": "connito.prune/1",
    "checkpoint": "/m/moe",
    "keep": 2,
    "score": "token",
    "kept": {"0": [0, 3], "1": [1, 2]},
    "removed": [[0, 1], [0, 2], [1, 0], [1, 3]],
    "scores": [[0.5, 0.125, 0.125, 0.25], [0.0, 0.5, 0.25, 0.25]],
}
REAP = {**PRUNE, "score": "reap", "calibration": {"split": "validation", "domains": ["code"], "tokens": 512},
        "validation_loss": LOSS}  # fmt: skip
MERGE = {
    "schema": "connito.merge/1",
    "checkpoint": "/m/moe",
    "keep": None,
    "similarity": None,
    "frequency": "uniform",
    "groups": [[0, 1, 2]],
    "shares": [[0.5, 0.5]],
    "kept": {"0": [0, 1, 3], "1": [0, 1, 2, 3]},
    "validation_loss": LOSS,
}
SHARE_REPORT = {
    "schema": "connito.share_report/1",
    "checkpoint": "/m/moe",
    "pick": "drivers",
    "per_layer": 1,
    "shared_from": {"0": [2]},
    "distillation_mse": {"0": [0.25, 0.125]},
}
SHARE = {
    "schema": "connito.share/1",
    "source": "/m/moe",
    "pick": "drivers",
    "domains": [],
    "shared_from": {"0": [2]},
    "merge_weights": {"0": [1.0]},
    "scale": {"0": 0.5},
    "distillation": {"steps": 0, "lr": 0.001, "mse": {}},
}
PROGRESSIVE = {
    "schema": "connito.progressive_prune/1",
    "options": {"target": 2, "window": 2},
    "train_steps": 8,
    "num_windows": 2,
    "windows_done": 1,
    "moe_layers": [0, 1],
    "num_experts": 4,
    "top_k": 2,
    "windows": [{"window": 0, "step": 2, "pruned": [[0, 1]]}],
    "alive_mask": [[1, 0, 1, 1], [1, 1, 1, 1]],
    "kept": {"0": [0, 2, 3], "1": [0, 1, 2, 3]},
    "pruned_dir": None,
}
CASES = [
    (PruneReport, PRUNE, "pruning report", "prune again with `connito prune`"),
    (PruneReport, REAP, "pruning report", "prune again with `connito prune`"),
    (MergeReport, MERGE, "expert-merge report", "merge again with `connito merge`"),
    (ShareReport, SHARE_REPORT, "shared-expert report", "build the shared expert again with `connito share`"),
    (ShareRecord, SHARE, "shared-expert provenance record", "build the shared expert again with `connito share`"),
    (ProgressivePruneRecord, PROGRESSIVE, "progressive-pruning record",
     "point at the progressive_prune.json of a run with callbacks.progressive_prune"),
]  # fmt: skip
IDS = ["prune", "prune-reap-measured", "merge", "share_report", "share", "progressive_prune"]


@pytest.mark.parametrize(("cls", "record", "what", "fix"), CASES, ids=IDS)
def test_round_trip_byte_identity_and_refusals(tmp_path, cls, record, what, fix):
    check_record_kind(tmp_path, cls, record, indented(1, "\n"), what, fix)  # atomic_write_json(..., end="\n")


def test_fields_are_read_by_attribute_and_the_optional_keys_stay_out_until_set(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps(PRUNE, indent=1))
    pruned = PruneReport.load(tmp_path / "p.json")
    assert (pruned.kept["1"], pruned.calibration, pruned.validation_loss) == ([1, 2], None, None)
    assert "calibration" not in pruned.to_dict() and "validation_loss" not in pruned.to_dict()
