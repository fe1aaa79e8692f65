"""The connito.adaptation/1 record (adapt.json) as a class: round trip byte for byte, the report table read by
attribute, another schema and a newer version refused with the file, the schemas and the fix."""

import json

import pytest

from connito.adaptation.outcome import AdaptOutcome, OutcomeError, outcome_table, read_outcomes

FIX = "point at the adapt.json of a `connito adapt` run (or its run directory)"


def record() -> dict:
    """Keys in the order measure_outcome writes them."""
    return {
        "schema": "connito.adaptation/1",
        "method": "esft-gate",
        "base": {"path": "/base", "fingerprint": "sha256:" + "ef" * 32},
        "adapted_domains": ["code"],
        "loss": {d: {"tokens": 100, "base": 3.0, "adapted": a, "adapted_plain": a}
                 for d, a in (("code", 2.5), ("docs", 3.25))},
        "router": "the family's (plain transformers)",
        "gain": 0.5,
        "forgetting": 0.25,
        "trainable_params": 250,
        "total_params": 1000,
        "optimizer_state_bytes": 2**21,
        "step_seconds": 0.125,
        "steps": 3,
        "delta": {"path": "/run/delta", "bytes": 2**20},
    }  # fmt: skip


def test_round_trip_is_byte_identical_and_the_table_reads_by_attribute(tmp_path):
    (tmp_path / "adapt.json").write_text(json.dumps(record(), indent=1))
    loaded = AdaptOutcome.load(tmp_path)
    assert loaded.to_dict() == record() and loaded.gain == 0.5 and loaded.loss["docs"]["adapted"] == 3.25
    assert loaded.save(tmp_path / "again.json").read_text() == (tmp_path / "adapt.json").read_text()
    assert read_outcomes([tmp_path, tmp_path / "again.json"]) == [loaded, loaded]
    assert outcome_table([loaded]).splitlines()[-1] == (
        "| esft-gate | +0.5000 | +0.2500 | 250 (25.0%) | 2.00 MiB | 125 ms | 1.00 MiB |"
    )


def test_another_schema_and_a_newer_version_are_refused_with_the_exact_message(tmp_path):
    path = tmp_path / "adapt.json"
    path.write_text(json.dumps({**record(), "schema": "connito.analysis/1"}))
    with pytest.raises(OutcomeError) as caught:
        AdaptOutcome.load(path)
    assert str(caught.value) == (
        f"{path} is not a Connito adaptation record: schema 'connito.analysis/1', expected 'connito.adaptation/1'; "
        f"{FIX}"
    )
    path.write_text(json.dumps({**record(), "schema": "connito.adaptation/2"}))
    with pytest.raises(OutcomeError) as caught:
        read_outcomes([tmp_path])
    assert str(caught.value) == (
        f"{path} is a Connito adaptation record of schema 'connito.adaptation/2', newer than this Connito reads "
        f"('connito.adaptation/1'): upgrade Connito, or {FIX}"
    )
    with pytest.raises(FileNotFoundError, match=r"no adapt.json at .*nowhere/adapt.json: is it a finished"):
        AdaptOutcome.load(tmp_path / "nowhere" / "adapt.json")
