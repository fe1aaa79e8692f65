"""routing_state.json (a routing mode's export manifest): one class, the file byte for byte as the writer wrote it
before the class (json.dumps(manifest, indent=1), no final newline), read by field, another kind or a newer version
refused naming the file, the schemas and the fix."""

from connito.routing.routing_export import RoutingStateManifest
from tests.common.record_contract import check_record_kind, indented

ROUTING = {
    "format": "connito.routing_state/1",
    "options": {"mode": "expert_choice", "capacity_factor": 1.0},
    "model_type": "mixtral",
    "moe_layers": [0, 1],
    "hf_route": "plain transformers loads these weights and routes them top-k, not as trained",
    "load": "connito.routing.routing_export.load_routing_mode(model, export_dir)",
}
FIX = "point at the export (<run>/hf) of a run trained with callbacks.expert_choice or callbacks.expert_threshold"


def test_round_trip_byte_identity_and_refusals(tmp_path):
    check_record_kind(tmp_path, RoutingStateManifest, ROUTING, indented(1, ""), "routing-state manifest", FIX)
    loaded = RoutingStateManifest.load(tmp_path / "again.json")
    assert (loaded.model_type, loaded.options["mode"], loaded.moe_layers) == ("mixtral", "expert_choice", [0, 1])
