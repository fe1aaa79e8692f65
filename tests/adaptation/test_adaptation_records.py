"""DES-MoE's export manifest (des_moe_router.json): one class, the file byte for byte as the writer wrote it before
the class (json.dumps(manifest, indent=1), no final newline), read by field, another kind or a newer version refused
naming the file, the schemas and the fix. tests/routing/test_routing_records.py holds the same checks for
routing_state.json."""

import pytest

from connito.adaptation.des_moe.export import DesMoeRouterManifest
from tests.common.record_contract import check_record_kind, indented

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


@pytest.mark.parametrize(("cls", "record", "what", "fix"), CASES, ids=IDS)
def test_round_trip_byte_identity_and_refusals(tmp_path, cls, record, what, fix):
    check_record_kind(tmp_path, cls, record, indented(1, ""), what, fix)  # json.dumps(manifest, indent=1)
    assert cls.load(tmp_path / "again.json").moe_layers == [0, 1]
