"""DES-MoE's export manifest (des_moe_router.json): one class, the file byte for byte as the writer wrote it before
the class (json.dumps(manifest, indent=1), no final newline), read by field, another kind or a newer version refused
naming the file, the schemas and the fix. tests/routing/test_routing_records.py holds the same checks for
routing_state.json."""

import json

import pytest

from connito.adaptation.des_moe.export import DesMoeRouterManifest
from connito.common.records import RecordError

DES_MOE = {
    "format": "connito.des_moe_router/1",
    "model_type": "olmoe",
    "moe_layers": [0, 1],
    "hidden_mult": 2,
    "hf_router": "least-squares fold of the adaptive router (exact where its MLP output layer is zero)",
    "folds": [{"layer": 0, "exact": False, "topk_agreement": 0.875, "logit_rmse": 0.01, "tokens": 64}],
    "load": "connito.adaptation.des_moe.export.load_adaptive_router(model, export_dir)",
    "config": {"kd_weight": 1.0},
    "map": {"step": 8, "experts": {"code": [[0, 1]]}},
}
CASES = [
    (DesMoeRouterManifest, DES_MOE, "DES-MoE router manifest",
     "point at the export (<run>/hf) of a run trained with callbacks.des_moe"),
    (DesMoeRouterManifest, {k: v for k, v in DES_MOE.items() if k not in ("config", "map")},
     "DES-MoE router manifest", "point at the export (<run>/hf) of a run trained with callbacks.des_moe"),
]  # fmt: skip
IDS = ["des_moe_router", "des_moe_router-bare"]


def _old_format(record: dict) -> str:
    return json.dumps(record, indent=1)


@pytest.mark.parametrize(("cls", "record", "what", "fix"), CASES, ids=IDS)
def test_round_trip_is_byte_identical_to_the_old_format(tmp_path, cls, record, what, fix):
    path = tmp_path / "manifest.json"
    path.write_text(_old_format(record))
    loaded = cls.load(path)
    assert loaded.to_dict() == record and loaded.moe_layers == [0, 1]
    loaded.save(tmp_path / "again.json")
    assert (tmp_path / "again.json").read_bytes() == path.read_bytes()


@pytest.mark.parametrize(("cls", "record", "what", "fix"), CASES, ids=IDS)
def test_another_kind_is_refused_with_the_exact_message(tmp_path, cls, record, what, fix):
    path = tmp_path / "manifest.json"
    path.write_text(_old_format({**record, "format": "connito.mask/1"}))
    with pytest.raises(RecordError) as caught:
        cls.load(path)
    assert str(caught.value) == f"{path} is not a {what}: schema 'connito.mask/1', expected {cls.SCHEMA!r}; {fix}"


@pytest.mark.parametrize(("cls", "record", "what", "fix"), CASES, ids=IDS)
def test_a_future_version_is_refused_with_the_exact_message(tmp_path, cls, record, what, fix):
    path = tmp_path / "manifest.json"
    future = cls.SCHEMA.replace("/1", "/2")
    path.write_text(_old_format({**record, "format": future}))
    with pytest.raises(RecordError) as caught:
        cls.load(path)
    assert str(caught.value) == (
        f"{path} is a {what} of schema {future!r}, newer than this Connito reads ({cls.SCHEMA!r}): upgrade "
        f"Connito, or {fix}"
    )
