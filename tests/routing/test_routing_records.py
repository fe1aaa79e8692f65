"""routing_state.json (a routing mode's export manifest): one class, the file byte for byte as the writer wrote it
before the class (json.dumps(manifest, indent=1), no final newline), read by field, another kind or a newer version
refused naming the file, the schemas and the fix."""

import json

import pytest

from connito.common.records import RecordError
from connito.routing.routing_export import RoutingStateManifest

ROUTING = {
    "format": "connito.routing_state/1",
    "options": {"mode": "expert_choice", "capacity_factor": 1.0},
    "model_type": "mixtral",
    "moe_layers": [0, 1],
    "hf_route": "plain transformers loads these weights and routes them top-k, not as trained",
    "load": "connito.routing.routing_export.load_routing_mode(model, export_dir)",
}
FIX = "point at the export (<run>/hf) of a run trained with callbacks.expert_choice or callbacks.expert_threshold"


def test_round_trip_is_byte_identical_to_the_old_format(tmp_path):
    path = tmp_path / "routing_state.json"
    path.write_text(json.dumps(ROUTING, indent=1))
    loaded = RoutingStateManifest.load(path)
    assert loaded.to_dict() == ROUTING and (loaded.model_type, loaded.options["mode"]) == ("mixtral", "expert_choice")
    loaded.save(tmp_path / "again.json")
    assert (tmp_path / "again.json").read_bytes() == path.read_bytes()


@pytest.mark.parametrize(
    ("found", "message"),
    [
        ("connito.mask/1", "{path} is not a routing-state manifest: schema 'connito.mask/1', expected "
                           "'connito.routing_state/1'; " + FIX),
        ("connito.routing_state/2", "{path} is a routing-state manifest of schema 'connito.routing_state/2', newer "
                                    "than this Connito reads ('connito.routing_state/1'): upgrade Connito, or " + FIX),
    ],
    ids=["another-kind", "future-version"],
)  # fmt: skip
def test_another_kind_and_a_future_version_are_refused_with_the_exact_message(tmp_path, found, message):
    path = tmp_path / "routing_state.json"
    path.write_text(json.dumps({**ROUTING, "format": found}, indent=1))
    with pytest.raises(RecordError) as caught:
        RoutingStateManifest.load(path)
    assert str(caught.value) == message.format(path=path)
