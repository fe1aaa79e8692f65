"""The composition provenance records (connito_btx/bam/flexolmo/bts/groups.json): one class per kind, the file
byte for byte as the writers wrote it before the classes (json.dumps(record, indent=2) + newline), read by field,
another kind or a newer version refused naming the file, the schemas and the fix."""

import json

import pytest

from connito.common.records import RecordError
from connito.composition.fft_moe.server import UpdateRecord
from connito.composition.provenance import BamRecord, BtsRecord, BtxRecord, FlexOlmoRecord, GroupsRecord
from tests.common.record_contract import check_record_kind, indented

SEED = {"path": "/m/seed", "fingerprint": "sha256:" + "a" * 64, "model_type": "llama"}
BTX = {
    "schema": "connito.btx/1",
    "method": "branch-train-mix merge (Sukhbaatar et al. 2024)",
    "seed": SEED,
    "branches": [{"path": "/m/b0", "fingerprint": "sha256:" + "b" * 64}],
    "options": {"family": "mixtral", "generalist": False, "chunks": 1, "router_init": "normal"},
    "experts": ["branch 0", "seed (generalist)"],
    "shared_expert": None,
    "router": {"top_k": 2, "norm_topk_prob": True, "aux_loss_coef": 0.01, "init": "normal(0, 0.02), seed 0"},
    "created": "2026-12-06T05:00:00+00:00",
}
BAM = {
    **BTX,
    "schema": "connito.bam/1",
    "method": "BAM upcycling (Zhang et al. 2024): FFN and attention experts from the branches",
    "attention": {"experts": ["branch 0"], "routing": "soft", "kv_sharing": True, "router_init": "given tensor"},
}
OWNER_START = {
    "schema": "connito.flexolmo/1",
    "role": "owner_start",
    "method": "FlexOlmo (Shi et al. 2025): a data owner's start",
    "public": {"path": "/m/public", "fingerprint": "sha256:" + "c" * 64},
    "family": "mixtral",
    "experts": ["public FFN (frozen)", "owner (starts as a copy of the public FFN)"],
    "router": {"top_k": 2, "init": "given tensor", "public_rows_sha256": "d" * 64},
    "train": {"experts": [[0, 1], [1, 1]], "router_rows": True},
    "created": "2026-12-06T05:00:00+00:00",
}
MERGED = {
    "schema": "connito.flexolmo/1",
    "role": "merged",
    "method": "FlexOlmo (Shi et al. 2025): owners' experts merged against the public model",
    "public": {"path": "/m/public", "fingerprint": "sha256:" + "c" * 64},
    "family": "mixtral",
    "public_expert": 0,
    "owners": {"code": {"expert": 1, "path": "/m/code", "fingerprint": "sha256:" + "e" * 64}},
    "experts": ["public", "code"],
    "router": {"top_k": 2, "rows": "public row (as in every owner), then each owner's trained row"},
    "created": "2026-12-06T05:00:00+00:00",
}
BTS = {
    "schema": "connito.bts/1",
    "method": "branch-train-stitch (Zhang et al. 2025): frozen hub and branches, trained stitch layers",
    "hub": SEED,
    "branches": [{"name": "code", "path": "/m/b0", "fingerprint": "sha256:" + "b" * 64}],
    "stitch_every": 2,
    "stitches_after_layers": [1, 3],
    "init": "projections 0 (identity), gates normal(0, 0.02), seed 0",
    "created": "2026-12-06T05:00:00+00:00",
}
GROUPS = {
    "schema": "connito.groups/1",
    "method": "expert groups: disjoint experts of one base trained as separate jobs, merged onto it",
    "base": SEED,
    "packages": {"code": {"path": "/p/code", "experts": [[1, 0]], "modules": [], "created": "x"}},
    "overlap": "refuse",
    "overlaps": {"experts": [], "modules": []},
    "dtype": "float32",
    "validation": {"loss": 1.25},
    "created": "2026-12-06T05:00:00+00:00",
}
CASES = [
    (BtxRecord, BTX, "BTX provenance record", "merge the branches again with `connito btx` (merge_branches)"),
    (BamRecord, BAM, "BAM provenance record", "upcycle the branches again with `connito btx method=bam` (merge_bam)"),
    (FlexOlmoRecord, OWNER_START, "FlexOlmo provenance record",
     "start the owner again with owner_start (or merge again with merge_owners)"),
    (FlexOlmoRecord, MERGED, "FlexOlmo provenance record",
     "start the owner again with owner_start (or merge again with merge_owners)"),
    (BtsRecord, BTS, "BTS provenance record", "stitch the branches again with stitch_branches"),
    (BtsRecord, {**BTS, "opted_out": ["code"]}, "BTS provenance record",
     "stitch the branches again with stitch_branches"),
    (GroupsRecord, GROUPS, "groups provenance record",
     "merge the groups again with `connito groups` (merge_groups)"),
]  # fmt: skip
IDS = ["btx", "bam", "flexolmo-owner_start", "flexolmo-merged", "bts", "bts-opted_out", "groups"]


def _old_format(record: dict) -> str:
    """How the writers wrote these files before the classes (write_checkpoint, merge_groups)."""
    return json.dumps(record, indent=2) + "\n"


@pytest.mark.parametrize(("cls", "record", "what", "fix"), CASES, ids=IDS)
def test_round_trip_byte_identity_and_refusals(tmp_path, cls, record, what, fix):
    check_record_kind(tmp_path, cls, record, _old_format, what, fix)


def test_a_provenance_record_loads_from_its_checkpoint_directory(tmp_path):
    (tmp_path / BtxRecord.FILE).write_text(_old_format(BTX))
    assert BtxRecord.load(tmp_path) == BtxRecord.load(tmp_path / BtxRecord.FILE)


def test_fields_are_read_by_attribute(tmp_path):
    (tmp_path / FlexOlmoRecord.FILE).write_text(_old_format(MERGED))
    merged = FlexOlmoRecord.load(tmp_path)
    assert (merged.role, merged.public_expert, merged.owners["code"]["expert"], merged.train) == ("merged", 0, 1, None)
    (tmp_path / GroupsRecord.FILE).write_text(_old_format(GROUPS))
    assert GroupsRecord.load(tmp_path).validation == {"loss": 1.25}


def test_a_record_missing_a_key_names_it(tmp_path):
    path = tmp_path / BtxRecord.FILE
    path.write_text(_old_format({key: value for key, value in BTX.items() if key != "router"}))
    with pytest.raises(RecordError) as caught:
        BtxRecord.load(path)
    assert str(caught.value) == (
        f"{path} lacks ['router']: merge the branches again with `connito btx` (merge_branches)"
    )


# update.json of an FFT-MoE client: its run's keys follow num_examples in the run's own order (the client callback's
# spec first; the export's re-packaged update only top_k, layers, tokens_per_expert)
UPDATE = {"schema": "connito.fft_moe.update/1", "client": "code", "num_examples": 20, "num_experts": 4, "width": 2,
          "activation": "silu", "layers": [0, 1], "top_k": 1,
          "tokens_per_expert": [[5, 0, 0, 0], [0, 0, 0, 0]]}  # fmt: skip
UPDATE_FIX = "the client sends its update again (rerun its round job)"


@pytest.mark.parametrize("record", [UPDATE, {k: v for k, v in UPDATE.items() if k not in ("num_experts", "width",
                                                                                            "activation")}],
                         ids=["from-the-callback", "re-packaged"])  # fmt: skip
def test_update_record_round_trip_byte_identity_and_refusals(tmp_path, record):
    check_record_kind(tmp_path, UpdateRecord, record, indented(1, "\n"), "FFT-MoE update record", UPDATE_FIX)
    (tmp_path / "update.json").write_text(json.dumps(record, indent=1) + "\n")
    update = UpdateRecord.load(tmp_path / "update.json")
    assert (update.client, update.num_examples, update.top_k, update.layers) == ("code", 20, 1, [0, 1])
    assert update.tokens_per_expert[0] == [5, 0, 0, 0]
